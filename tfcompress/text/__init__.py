"""Tokenization into the BERT encoder's inputs."""

from tfcompress.text.preprocessor import BertPreprocessor, encode_numpy

__all__ = ["BertPreprocessor", "encode_numpy"]
