"""Checks that an encoder fits the inputs it will be given."""

import os

from tfcompress._keras import keras

_WORD_EMBEDDINGS = "embeddings/word_embeddings"


def _vocab_size(preprocessor_or_vocab_file):
    if hasattr(preprocessor_or_vocab_file, "vocab_size"):
        return int(preprocessor_or_vocab_file.vocab_size), "the preprocessor's vocabulary"
    if not isinstance(preprocessor_or_vocab_file, (str, os.PathLike)):
        raise TypeError(
            "preprocessor_or_vocab_file must be a BertPreprocessor or the path of a "
            f"vocab file; received {type(preprocessor_or_vocab_file).__name__}."
        )
    path = os.fspath(preprocessor_or_vocab_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vocab file not found: {path!r}.")
    # One token a line, as BertPreprocessor reads it; a final newline ends the last token.
    with open(path, encoding="utf-8") as f:
        count = sum(1 for _ in f)
    return count, f"vocab file {path!r}"


def _word_embedding_rows(encoder):
    if not isinstance(encoder, keras.Model):
        raise TypeError(f"encoder must be a tf_keras Model; received {type(encoder).__name__}.")
    layers = {layer.name: layer for layer in encoder.layers}
    if _WORD_EMBEDDINGS not in layers:
        raise ValueError(
            f"model {encoder.name!r} has no layer {_WORD_EMBEDDINGS!r}; pass an encoder "
            "built by tfcompress.bert (build_encoder, load_minilm, from_huggingface or "
            "from_hub) or a classifier made from one."
        )
    return int(layers[_WORD_EMBEDDINGS].input_dim)


def check_vocab(preprocessor_or_vocab_file, encoder):
    """Raise unless the vocabulary has as many tokens as the encoder's word embedding table.

    A larger vocabulary yields ids past the end of the table. A smaller one means the
    vocabulary belongs to another checkpoint, whose ids select unrelated rows, so both
    cases are errors.

    Args:
      preprocessor_or_vocab_file: a ``BertPreprocessor`` (anything with a
        ``vocab_size``) or the path of a WordPiece vocab file, one token a line.
      encoder: a tfcompress encoder, or a classifier built on one.

    Returns:
      The vocabulary size, equal to the number of embedding rows.

    Raises:
      ValueError: the two sizes differ.
    """
    vocab_size, source = _vocab_size(preprocessor_or_vocab_file)
    rows = _word_embedding_rows(encoder)
    if vocab_size != rows:
        raise ValueError(
            f"{source} has {vocab_size} tokens but the word embedding table of "
            f"{encoder.name!r} has {rows} rows. Use the vocab file the encoder was "
            "trained with (for the embedded MiniLM, tfcompress.bert.minilm_vocab())."
        )
    return vocab_size
