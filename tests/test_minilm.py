import numpy as np
import pytest

from tfcompress.bert import minilm_vocab
from tfcompress.text import BertPreprocessor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenized(reference):
    pre = BertPreprocessor(minilm_vocab(), seq_length=reference["input_ids"].shape[1])
    return pre(list(reference["sentences"]))


def test_token_ids_match_reference(tokenized, reference):
    np.testing.assert_array_equal(tokenized["input_word_ids"].numpy(), reference["input_ids"])
    np.testing.assert_array_equal(tokenized["input_mask"].numpy(), reference["attention_mask"])
    np.testing.assert_array_equal(tokenized["input_type_ids"].numpy(), reference["token_type_ids"])


def test_outputs_match_reference(minilm, tokenized, reference):
    out = minilm(tokenized, training=False)
    # 1e-4 absolute: float32 in both, only the summation order differs.
    np.testing.assert_allclose(out["sequence_output"].numpy(), reference["sequence_output"], atol=1e-4)
    np.testing.assert_allclose(out["pooled_output"].numpy(), reference["pooled_output"], atol=1e-4)


def test_sentence_embedding_matches_reference(minilm, tokenized, reference):
    from tfcompress.bert import MaskedMeanPooling

    out = minilm(tokenized, training=False)
    pooled = MaskedMeanPooling()([out["sequence_output"], tokenized["input_mask"]]).numpy()
    embedding = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    np.testing.assert_allclose(embedding, reference["sentence_embedding"], atol=1e-4)


def test_minilm_shape(minilm):
    assert minilm.count_params() == 22713216
    assert len(minilm.output["encoder_outputs"]) == 6
