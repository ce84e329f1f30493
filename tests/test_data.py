import hashlib

import numpy as np
import pytest

from tfcompress._keras import keras, tf
from tfcompress.data import Splits, TextDataset, from_csv, load_tweets, split
from tfcompress.data.csv_files import read_csv
from tfcompress.data.tweets import TWEET_LABELS, tweets_csv


def _sha256(texts):
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()


@pytest.fixture(scope="module")
def tweets():
    return load_tweets(seed=0)


# ---------------------------------------------------------------------------
# Embedded corpus.
# ---------------------------------------------------------------------------

def test_tweets_cleaning_counts():
    dataset, skipped = read_csv(tweets_csv(), "text", "sentiment", labels=TWEET_LABELS,
                                errors="replace")
    # 38158 rows: 364 repeat a text with the same label, 609 share a text labelled two ways.
    assert len(dataset) == 38158 - 364 - 609
    assert {reason: len(lines) for reason, lines in skipped.lines.items()} == {
        "duplicate rows": 364, "rows whose text also appears with another label": 609}
    assert dataset.label_counts() == [15954, 14424, 6807]
    assert len(set(dataset.texts)) == len(dataset)
    # Undecodable bytes became U+FFFD and no text keeps a newline or a double space.
    assert sum("\ufffd" in t for t in dataset.texts) > 4000
    assert not any("\n" in t or "  " in t or t != t.strip() for t in dataset.texts)


def test_tweets_split_pins(tweets):
    assert tweets.labels == ("negative", "neutral", "positive")
    assert [len(tweets.train), len(tweets.validation), len(tweets.test)] == [29749, 3718, 3718]
    assert tweets.train.label_counts() == [12764, 11540, 5445]
    assert tweets.validation.label_counts() == [1595, 1442, 681]
    assert tweets.test.label_counts() == [1595, 1442, 681]
    assert _sha256(tweets.test.texts) == (
        "9590298a690d05e4b3753961dfb4566b6263e9c17f0ad5a1982722c22e5030c3")
    assert tweets.test.labels.dtype == np.int32


def test_tweets_splits_disjoint(tweets):
    train, validation, test = (set(d.texts) for d in (tweets.train, tweets.validation, tweets.test))
    assert not train & test
    assert not train & validation
    assert not validation & test


def test_tweets_limit_per_split(tweets):
    small = load_tweets(seed=0, limit_per_split=100)
    for name in ("train", "validation", "test"):
        part = getattr(small, name)
        assert len(part) == 100
        # 1595:1442:681 of 100 by largest remainder is 43:39:18 (42.9, 38.8, 18.3).
        assert part.label_counts() == [43, 39, 18]
        assert set(part.texts) <= set(getattr(tweets, name).texts)
    assert _sha256(small.test.texts) == (
        "3ab974f6c8db5d18a5696969db64c5763bfd2fabe5a6e1b187286222d0f564ad")


# ---------------------------------------------------------------------------
# Splits and subsamples.
# ---------------------------------------------------------------------------

def _toy(n_per_label=(10, 20)):
    texts, labels = [], []
    for label, n in enumerate(n_per_label):
        texts += [f"label {label} text {i}" for i in range(n)]
        labels += [label] * n
    return TextDataset(texts, labels, ("a", "b"))


def test_split_stratified_counts():
    splits = split(_toy((10, 20)), fractions=(0.8, 0.1, 0.1), seed=3)
    assert isinstance(splits, Splits)
    assert splits.train.label_counts() == [8, 16]
    assert splits.validation.label_counts() == [1, 2]
    assert splits.test.label_counts() == [1, 2]


def test_split_ignores_input_order():
    dataset = _toy((10, 20))
    reversed_dataset = dataset.select(range(len(dataset) - 1, -1, -1))
    first, second = split(dataset, seed=1), split(reversed_dataset, seed=1)
    assert first.test.texts == second.test.texts
    assert first.train.texts == second.train.texts
    assert split(dataset, seed=2).test.texts != first.test.texts


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match=r"sum to 1; received \(0\.8, 0\.1, 0\.2\)"):
        split(_toy(), fractions=(0.8, 0.1, 0.2))


def test_subsample_stratified_and_nested():
    dataset = _toy((10, 30))
    small, smaller = dataset.subsample(8, seed=0), dataset.subsample(4, seed=0)
    assert small.label_counts() == [2, 6]
    assert smaller.label_counts() == [1, 3]
    assert set(smaller.texts) <= set(small.texts)
    assert dataset.subsample(100) is dataset


class _ToyPreprocessor:
    """Map each text to a [4] int32 id row from its length, which is enough for fit."""

    def __call__(self, texts):
        lengths = tf.strings.length(texts)
        ids = tf.tile(lengths[:, tf.newaxis] % 50, [1, 4])
        ones = tf.ones_like(ids)
        return {"input_word_ids": ids, "input_mask": ones, "input_type_ids": 0 * ones}


def test_to_tf_dataset_batches_and_fit():
    dataset = _toy((10, 20))
    ds = dataset.to_tf_dataset(_ToyPreprocessor(), batch_size=8)
    batches = list(ds)
    assert [int(b[1].shape[0]) for b in batches] == [8, 8, 8, 6]
    features, labels = batches[0]
    assert sorted(features) == ["input_mask", "input_type_ids", "input_word_ids"]
    assert features["input_word_ids"].dtype == tf.int32
    np.testing.assert_array_equal(labels.numpy(), dataset.labels[:8])

    inputs = {name: keras.Input(shape=(4,), dtype=tf.int32, name=name) for name in features}
    embedded = keras.layers.Embedding(50, 4)(inputs["input_word_ids"])
    logits = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(embedded))
    model = keras.Model(inputs, logits)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(ds, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_to_tf_dataset_shuffle_is_seeded():
    dataset = _toy((10, 20))
    first = np.concatenate([y.numpy() for _, y in dataset.to_tf_dataset(
        _ToyPreprocessor(), 30, shuffle=True, seed=5)])
    again = np.concatenate([y.numpy() for _, y in dataset.to_tf_dataset(
        _ToyPreprocessor(), 30, shuffle=True, seed=5)])
    np.testing.assert_array_equal(first, again)
    assert sorted(first.tolist()) == sorted(dataset.labels.tolist())
    assert first.tolist() != dataset.labels.tolist()


def test_to_tf_dataset_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size must be a positive integer; received 0"):
        _toy().to_tf_dataset(_ToyPreprocessor(), batch_size=0)


# ---------------------------------------------------------------------------
# CSV files.
# ---------------------------------------------------------------------------

def test_from_csv_quotes_newlines_bom(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(
        b"\xef\xbb\xbfid,text,label\n"
        b'1,"Hello, ""world""",pos\n'
        b'2,"two\nlines  here",neg\n'
        b"3,plain,pos\n")
    dataset = from_csv(path, "text", "label")
    assert dataset.texts == ['Hello, "world"', "two lines here", "plain"]
    assert dataset.label_names == ("neg", "pos")
    assert dataset.labels.tolist() == [1, 0, 1]


def test_from_csv_skips_bad_rows_with_one_warning(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(
        b"text,label\n"          # line 1
        b"good one,a\n"          # line 2
        b"bad \xff byte,b\n"     # line 3
        b"\n"                    # line 4, empty
        b'"spans\ntwo",b\n'      # lines 5-6
        b"   ,a\n"               # line 7, empty text
        b"bad \xfe again,a\n"    # line 8
        b"good two,b\n")         # line 9
    with pytest.warns(UserWarning) as record:
        dataset = from_csv(path, "text", "label")
    assert len(record) == 1
    message = str(record[0].message)
    assert "skipped 4 rows" in message
    assert "2 rows with bytes that are not valid utf-8 (line 3, 8)" in message
    assert "1 empty rows (line 4)" in message
    assert "1 rows with empty text (line 7)" in message
    assert dataset.texts == ["good one", "spans two", "good two"]
    assert dataset.labels.tolist() == [0, 1, 1]


def test_from_csv_replace_keeps_undecodable_rows(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"text,label\nbad \xff byte,b\nfine,a\n")
    dataset = from_csv(path, "text", "label", errors="replace")
    assert dataset.texts == ["bad \ufffd byte", "fine"]


def test_from_csv_duplicates(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\nsame,a\nsame ,a\nother,b\nclash,a\nclash,b\nlast,b\n",
                    encoding="utf-8")
    with pytest.warns(UserWarning, match=r"1 duplicate rows \(line 3\); 2 rows whose text "
                                         r"also appears with another label \(line 5, 6\)"):
        dataset = from_csv(path, "text", "label")
    assert dataset.texts == ["same", "other", "last"]
    kept = from_csv(path, "text", "label", drop_duplicates=False)
    assert len(kept) == 6


def test_from_csv_fixed_label_order(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\nx,positive\ny,negative\n", encoding="utf-8")
    dataset = from_csv(path, "text", "label", labels=TWEET_LABELS)
    assert dataset.labels.tolist() == [2, 0]
    with pytest.raises(ValueError, match=r"values \['negative'\] that are not in labels=\['positive', 'neutral'\]"):
        from_csv(path, "text", "label", labels=("positive", "neutral"))


def test_from_csv_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CSV file not found: .*absent\.csv"):
        from_csv(tmp_path / "absent.csv", "text", "label")


def test_from_csv_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"\xef\xbb\xbf\n")
    with pytest.raises(ValueError, match=r"empty\.csv' is empty"):
        from_csv(path, "text", "label")


def test_from_csv_header_only(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(ValueError, match="has no usable data rows"):
        from_csv(path, "text", "label")


def test_from_csv_missing_column(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("tweet,sentiment\nx,a\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no column 'text'; the header has the columns "
                                         r"\['tweet', 'sentiment'\]"):
        from_csv(path, "text", "sentiment")


def test_from_csv_single_class(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\nx,spam\ny,spam\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"only one class, 'spam', in 2 rows"):
        from_csv(path, "text", "label")


def test_from_csv_then_split(tmp_path):
    path = tmp_path / "data.csv"
    rows = [f"text {i},{'a' if i % 3 else 'b'}" for i in range(30)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    splits = split(from_csv(path, "text", "label"), fractions=(0.6, 0.2, 0.2))
    # 20 'a' and 10 'b': validation and test take 4 + 2 each, train the rest.
    assert splits.train.label_counts() == [12, 6]
    assert splits.validation.label_counts() == [4, 2]
    assert splits.test.label_counts() == [4, 2]
