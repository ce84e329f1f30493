"""Labelled text datasets, deterministic stratified splits and subsamples.

Order and membership are decided by sha256 keys of ``seed`` and each text, so a split
is the same on every machine and run: it depends neither on the order the rows came in
nor on Python's hash seed.
"""

import dataclasses
import hashlib

import numpy as np

from tfcompress._keras import tf


def _keys(texts, seed):
    """Return one sha256 hex key per text; ties between equal texts keep input order."""
    return [hashlib.sha256(f"{seed}\x00{text}".encode("utf-8", "surrogatepass")).hexdigest()
            for text in texts]


@dataclasses.dataclass(frozen=True, eq=False)
class TextDataset:
    """Texts with integer labels.

    Attributes:
      texts: list of str.
      labels: int32 array, one label index per text.
      label_names: name of each label index, e.g. ("negative", "neutral", "positive").
    """

    texts: list
    labels: np.ndarray
    label_names: tuple

    def __post_init__(self):
        object.__setattr__(self, "texts", list(self.texts))
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int32))
        object.__setattr__(self, "label_names", tuple(self.label_names))
        if self.labels.shape != (len(self.texts),):
            raise ValueError(
                f"labels must be a 1-D array with one label per text ({len(self.texts)}); "
                f"received shape {self.labels.shape}."
            )
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.label_names)):
            raise ValueError(
                f"labels must be in [0, {len(self.label_names) - 1}] for label_names "
                f"{self.label_names}; received values from {self.labels.min()} to "
                f"{self.labels.max()}."
            )

    def __len__(self):
        return len(self.texts)

    def __repr__(self):
        return (f"TextDataset({len(self)} texts, label counts "
                f"{dict(zip(self.label_names, self.label_counts()))})")

    def label_counts(self):
        """Return the number of texts of each label, in label index order."""
        return np.bincount(self.labels, minlength=len(self.label_names)).astype(int).tolist()

    def select(self, indices):
        """Return the dataset of the texts at ``indices``, in that order."""
        indices = list(indices)
        return TextDataset([self.texts[i] for i in indices], self.labels[indices],
                           self.label_names)

    def subsample(self, max_examples, seed=0):
        """Return at most ``max_examples`` texts, stratified by label.

        Each label keeps its share of ``max_examples``, rounded by largest remainder.
        Within a label the texts with the smallest sha256 keys are kept, so the result
        is deterministic and a larger subsample contains a smaller one.
        """
        if not isinstance(max_examples, int) or max_examples < 1:
            raise ValueError(f"max_examples must be a positive integer; received {max_examples!r}.")
        if max_examples >= len(self):
            return self
        counts = np.asarray(self.label_counts())
        quota = _largest_remainder(counts, max_examples)
        keys = _keys(self.texts, seed)
        kept = []
        for label, take in enumerate(quota):
            members = sorted((keys[i], i) for i in np.flatnonzero(self.labels == label))
            kept += [i for _, i in members[:take]]
        kept.sort(key=lambda i: (keys[i], i))
        return self.select(kept)

    def to_tf_dataset(self, preprocessor, batch_size, shuffle=False, seed=0):
        """Return a ``tf.data.Dataset`` of (input dict, int32 label) batches for Keras fit.

        Texts are tokenized batch by batch inside the pipeline.

        Args:
          preprocessor: a callable from a batch of strings to the encoder's input dict,
            such as ``tfcompress.text.BertPreprocessor``.
          batch_size: number of texts per batch; the last batch may be smaller.
          shuffle: shuffle all texts, anew each epoch, in an order fixed by ``seed``.
          seed: seed of the shuffle.
        """
        if not callable(preprocessor):
            raise TypeError(
                "preprocessor must map a batch of strings to the encoder's input dict, "
                f"such as tfcompress.text.BertPreprocessor; received {type(preprocessor).__name__}."
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; received {batch_size!r}.")
        if not len(self):
            raise ValueError("the dataset is empty; there is nothing to batch.")
        dataset = tf.data.Dataset.from_tensor_slices(
            (tf.constant(self.texts, tf.string), tf.constant(self.labels, tf.int32)))
        if shuffle:
            dataset = dataset.shuffle(len(self), seed=seed, reshuffle_each_iteration=True)
        dataset = dataset.batch(batch_size)
        dataset = dataset.map(lambda texts, labels: (preprocessor(texts), labels),
                              num_parallel_calls=tf.data.AUTOTUNE)
        return dataset.prefetch(tf.data.AUTOTUNE)


def _largest_remainder(counts, total):
    """Split ``total`` over groups proportionally to ``counts``, summing to ``total``."""
    exact = counts * total / counts.sum()
    quota = np.floor(exact).astype(int)
    # Hand the remaining units to the largest fractional parts, lower label first on ties.
    order = sorted(range(len(counts)), key=lambda i: (-(exact[i] - quota[i]), i))
    for i in order[:total - quota.sum()]:
        quota[i] += 1
    return np.minimum(quota, counts).tolist()


@dataclasses.dataclass(frozen=True)
class Splits:
    """Train, validation and test datasets with their shared label names."""

    train: TextDataset
    validation: TextDataset
    test: TextDataset
    labels: tuple


def split(dataset, fractions=(0.8, 0.1, 0.1), seed=0):
    """Split ``dataset`` into train, validation and test sets, stratified by label.

    Within each label the texts are ordered by the sha256 key of ``seed`` and the text.
    The first ``round(n * fractions[1])`` go to validation, the next
    ``round(n * fractions[2])`` to test and the rest to train. Each split is ordered by
    key, which mixes the labels. Equal texts in different splits would leak test data,
    so ``from_csv`` drops duplicates before this.

    Args:
      dataset: a ``TextDataset``.
      fractions: (train, validation, test) fractions, each in [0, 1], summing to 1.
      seed: seed of the hash keys.

    Returns:
      ``Splits(train, validation, test, labels)``.
    """
    if not isinstance(dataset, TextDataset):
        raise TypeError(f"dataset must be a TextDataset; received {type(dataset).__name__}.")
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or any(not 0.0 <= f <= 1.0 for f in fractions) \
            or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(
            "fractions must be three numbers in [0, 1] (train, validation, test) that sum "
            f"to 1; received {fractions!r}."
        )
    keys = _keys(dataset.texts, seed)
    parts = {"train": [], "validation": [], "test": []}
    for label in range(len(dataset.label_names)):
        members = [i for _, i in sorted((keys[i], i) for i in np.flatnonzero(dataset.labels == label))]
        n = len(members)
        # int(x + 0.5) rounds halves up, the same on every platform.
        n_validation = int(n * fractions[1] + 0.5)
        n_test = min(int(n * fractions[2] + 0.5), n - n_validation)
        parts["validation"] += members[:n_validation]
        parts["test"] += members[n_validation:n_validation + n_test]
        parts["train"] += members[n_validation + n_test:]
    datasets = {name: dataset.select(sorted(indices, key=lambda i: (keys[i], i)))
                for name, indices in parts.items()}
    return Splits(labels=dataset.label_names, **datasets)
