"""Tokenization of strings into the BERT encoder's input dict.

tensorflow-text's ``FastBertTokenizer`` does the WordPiece split. This module adds what a
BERT preprocessing model adds around it: [CLS]/[SEP], sentence pairs with segment ids,
truncation to a fixed length (longest sequence first for pairs) and padding.
"""

import os

import numpy as np

from tfcompress._keras import tf


class BertPreprocessor:
    """Turn strings (or pairs of strings) into ``input_word_ids``, ``input_mask``, ``input_type_ids``.

    Args:
      vocab_file: path of a WordPiece vocabulary, one token a line.
      seq_length: length every output row is truncated or padded to, at least 3.
      lower_case: lower-case, NFD-normalise and strip accents first (uncased models).

    Call arguments:
      texts: a string, a list of strings, a 1-D numpy array or a tf string tensor.
      pairs: optional second segments, the same number as ``texts``.

    Returns:
      A dict of three int32 tensors of shape [batch, seq_length].
    """

    def __init__(self, vocab_file, seq_length=128, lower_case=True):
        import tensorflow_text as tf_text

        vocab_file = os.fspath(vocab_file)
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"vocab file not found: {vocab_file!r}.")
        if not isinstance(seq_length, int) or seq_length < 3:
            raise ValueError(
                f"seq_length must be an integer >= 3 (room for [CLS], one token and [SEP]); "
                f"received {seq_length!r}."
            )
        with open(vocab_file, encoding="utf-8") as f:
            self.vocab = [line.rstrip("\n").rstrip("\r") for line in f]
        if not self.vocab:
            raise ValueError(f"vocab file {vocab_file!r} is empty.")
        index = {token: i for i, token in enumerate(self.vocab)}
        missing = [t for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]") if t not in index]
        if missing:
            raise ValueError(f"vocab file {vocab_file!r} lacks the special tokens {missing}.")
        self.vocab_file = vocab_file
        self.seq_length = seq_length
        self.lower_case = lower_case
        self.cls_id = index["[CLS]"]
        self.sep_id = index["[SEP]"]
        self.pad_id = index["[PAD]"]
        self._tokenizer = tf_text.FastBertTokenizer(
            self.vocab, token_out_type=tf.int32, unknown_token="[UNK]",
            lower_case_nfd_strip_accents=lower_case)

    @property
    def vocab_size(self):
        return len(self.vocab)

    @staticmethod
    def _as_tensor(texts, argument):
        if isinstance(texts, str):
            texts = [texts]
        texts = tf.convert_to_tensor(texts)
        if texts.dtype != tf.string or texts.shape.rank != 1:
            raise TypeError(
                f"{argument} must be a string or a 1-D sequence of strings; received "
                f"dtype {texts.dtype.name} with shape {texts.shape}."
            )
        return texts

    @staticmethod
    def _clean(texts):
        # The Hugging Face BERT normalizer (tokenizers 0.23) maps tab, newline and carriage
        # return to a space and drops every other character of Unicode category C
        # (control, format, private use, unassigned) and U+FFFD, the replacement character
        # left by undecodable bytes. FastBertTokenizer does not, and a kept character
        # would turn its word into [UNK].
        texts = tf.strings.regex_replace(texts, r"[\t\n\r]", " ")
        return tf.strings.regex_replace(texts, r"[\p{C}\x{FFFD}]", "")

    def tokenize(self, texts, argument="texts"):
        """Return the WordPiece ids of each text as a ragged [batch, None] tensor."""
        return self._tokenizer.tokenize(self._clean(self._as_tensor(texts, argument)))

    def __call__(self, texts, pairs=None):
        first = self.tokenize(texts)
        budget = self.seq_length - 2
        if pairs is None:
            first = first[:, :budget]
            segments = [first]
        else:
            second = self.tokenize(pairs, "pairs")
            if first.nrows() is not None and int(first.nrows()) != int(second.nrows()):
                raise ValueError(
                    f"texts and pairs must have the same length; received {int(first.nrows())} "
                    f"and {int(second.nrows())}."
                )
            budget -= 1
            # Truncate the longer segment first, as BERT's reference preprocessing does.
            len_a = first.row_lengths()
            len_b = second.row_lengths()
            keep_a, keep_b = _truncate_pair(len_a, len_b, budget)
            first = tf.RaggedTensor.from_tensor(first.to_tensor(), lengths=keep_a)
            second = tf.RaggedTensor.from_tensor(second.to_tensor(), lengths=keep_b)
            segments = [first, second]

        batch = segments[0].nrows()
        cls = tf.fill([batch, 1], self.cls_id)
        sep = tf.fill([batch, 1], self.sep_id)
        pieces, types = [cls], [tf.zeros([batch, 1], tf.int32)]
        for segment_index, segment in enumerate(segments):
            pieces += [segment, sep]
            ones = tf.ones_like(segment, dtype=tf.int32) * segment_index
            types += [ones, tf.fill([batch, 1], segment_index)]
        ids = tf.concat([tf.RaggedTensor.from_tensor(p) if isinstance(p, tf.Tensor) else p
                         for p in pieces], axis=1)
        type_ids = tf.concat([tf.RaggedTensor.from_tensor(t) if isinstance(t, tf.Tensor) else t
                              for t in types], axis=1)
        shape = [None, self.seq_length]
        word_ids = ids.to_tensor(default_value=self.pad_id, shape=shape)
        mask = tf.ones_like(ids, dtype=tf.int32).to_tensor(default_value=0, shape=shape)
        type_ids = type_ids.to_tensor(default_value=0, shape=shape)
        return {"input_word_ids": word_ids, "input_mask": mask, "input_type_ids": type_ids}


def _truncate_pair(len_a, len_b, budget):
    """Lengths to keep of two segments so that they fit ``budget`` tokens together."""
    len_a = tf.cast(len_a, tf.int64)
    len_b = tf.cast(len_b, tf.int64)
    budget = tf.cast(budget, tf.int64)
    # Give each segment half the budget (the first one gets the odd token), then hand what
    # one does not use to the other. This equals Hugging Face's "longest_first" truncation.
    half = budget - budget // 2
    keep_a = tf.minimum(len_a, tf.maximum(half, budget - len_b))
    keep_b = tf.minimum(len_b, budget - keep_a)
    return keep_a, keep_b


def encode_numpy(preprocessor, texts, batch_size=256):
    """Tokenize a large list of texts in batches; return a dict of int32 numpy arrays."""
    parts = {k: [] for k in ("input_word_ids", "input_mask", "input_type_ids")}
    texts = list(texts)
    for start in range(0, len(texts), batch_size):
        out = preprocessor(texts[start:start + batch_size])
        for k in parts:
            parts[k].append(out[k].numpy())
    return {k: (np.concatenate(v) if v else np.zeros([0, preprocessor.seq_length], np.int32))
            for k, v in parts.items()}
