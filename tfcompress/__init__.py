"""tfcompress: make BERT-class Keras models small, measured from the bytes on disk."""

from tfcompress import _keras  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from tfcompress import bert, data, evaluate, export, layers, memory, text, train
from tfcompress.compress import CompressionReport, Recipe, Rule, compress, strip

__version__ = "0.1.0"

__all__ = ["CompressionReport", "Recipe", "Rule", "compress", "strip", "bert", "data", "evaluate", "export", "layers", "memory", "text", "train", "__version__"]
