"""Accuracy, macro F1 and latency of Keras and TFLite classifiers."""

from tfcompress.evaluate.latency import Latency, latency
from tfcompress.evaluate.metrics import Evaluation, evaluate_keras, evaluate_tflite, macro_f1

__all__ = ["Evaluation", "Latency", "evaluate_keras", "evaluate_tflite", "latency", "macro_f1"]
