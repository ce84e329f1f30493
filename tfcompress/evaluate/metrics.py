"""Accuracy and macro F1 of Keras and TFLite classifiers on a labelled split."""

import dataclasses
import os

import numpy as np

from tfcompress._keras import check_model, tf
from tfcompress.export import signature


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Classification quality on a labelled split.

    Attributes:
      accuracy: fraction of examples whose argmax equals the label.
      macro_f1: unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN); a class
        with no label and no prediction is left out of the mean.
      examples: number of examples evaluated.
      num_classes: width of the logits.
    """

    accuracy: float
    macro_f1: float
    examples: int
    num_classes: int


def macro_f1(labels, predictions, num_classes):
    """Return the macro-averaged F1 of integer ``predictions`` against ``labels``."""
    labels = np.asarray(labels, np.int64).ravel()
    predictions = np.asarray(predictions, np.int64).ravel()
    if labels.shape != predictions.shape:
        raise ValueError(f"labels and predictions differ in length: {labels.size} vs "
                         f"{predictions.size}.")
    scores = []
    for c in range(num_classes):
        true_positive = np.sum((predictions == c) & (labels == c))
        false_positive = np.sum((predictions == c) & (labels != c))
        false_negative = np.sum((predictions != c) & (labels == c))
        denominator = 2 * true_positive + false_positive + false_negative
        if denominator:
            scores.append(2 * true_positive / denominator)
    return float(np.mean(scores)) if scores else 0.0


def _summarize(logits, labels):
    logits = np.asarray(logits)
    labels = np.asarray(labels).ravel()
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"the model must return [batch, classes] logits with at least 2 "
                         f"classes; it returned shape {logits.shape}.")
    if labels.size != logits.shape[0]:
        raise ValueError(f"{labels.size} labels for {logits.shape[0]} examples.")
    predictions = logits.argmax(axis=1)
    return Evaluation(
        accuracy=float(np.mean(predictions == labels)),
        macro_f1=macro_f1(labels, predictions, logits.shape[1]),
        examples=int(labels.size),
        num_classes=int(logits.shape[1]),
    )


def _split(dataset, labels):
    if labels is not None:
        return dataset, labels
    if isinstance(dataset, tf.data.Dataset):
        return dataset, None
    if isinstance(dataset, tuple) and len(dataset) == 2:
        return dataset
    raise ValueError("pass labels, a (features, labels) tuple or a tf.data.Dataset of "
                     "(features, labels) pairs.")


def _labelled_examples(dataset, labels, specs):
    features, labels = _split(dataset, labels)
    data = features if labels is None else (features, labels)
    pairs = list(signature.iterate_examples(data, specs, "dataset", with_labels=True))
    if not pairs:
        raise ValueError("dataset is empty; pass at least one labelled example.")
    if any(label is None for _, label in pairs):
        raise ValueError("dataset has no labels; pass (features, labels) pairs.")
    return [example for example, _ in pairs], np.array([label for _, label in pairs])


def evaluate_keras(model, dataset, labels=None, batch_size=32):
    """Return the ``Evaluation`` of a Keras classifier.

    Args:
      model: a tf_keras model returning [batch, classes] logits.
      dataset: a ``tf.data.Dataset`` of (input dict, labels), a (features, labels)
        tuple, or features with ``labels`` given separately.
      labels: integer class ids, when ``dataset`` contains features only.
      batch_size: examples per model call.
    """
    check_model(model)
    features, labels = _split(dataset, labels)
    if isinstance(features, tf.data.Dataset):
        logits, collected = [], []
        for element in features.as_numpy_iterator():
            inputs, batch_labels = signature.split_features(element)
            logits.append(np.asarray(model(inputs, training=False)))
            collected.append(np.reshape(batch_labels, [-1]))
        return _summarize(np.concatenate(logits), np.concatenate(collected))
    logits = model.predict(features, batch_size=batch_size, verbose=0)
    return _summarize(logits, labels)


def tflite_input_specs(interpreter):
    """Return the ``InputSpec`` list of an interpreter's only signature."""
    signatures = interpreter.get_signature_list()
    if len(signatures) != 1:
        raise ValueError(f"expected a .tflite model with one signature; it has "
                         f"{sorted(signatures)}.")
    runner = interpreter.get_signature_runner()
    details = runner.get_input_details()
    return [signature.InputSpec(name, np.dtype(d["dtype"]).name, tuple(int(x) for x in d["shape"]))
            for name, d in sorted(details.items())]


def evaluate_tflite(path, dataset, labels=None, num_threads=None):
    """Return the ``Evaluation`` of a .tflite classifier, one example per invoke.

    Inputs are padded with zeros or truncated to the model's fixed sequence length.
    Arguments are as in ``evaluate_keras``; ``num_threads`` sets the interpreter's
    thread count.
    """
    from ai_edge_litert.interpreter import Interpreter

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TFLite model not found: {path!r}.")
    interpreter = Interpreter(model_path=path, num_threads=num_threads)
    specs = tflite_input_specs(interpreter)
    examples, labels = _labelled_examples(dataset, labels, specs)
    runner = interpreter.get_signature_runner()
    logits = []
    for example in examples:
        outputs = runner(**example)
        if len(outputs) != 1:
            raise ValueError(f"the model at {path!r} has outputs {sorted(outputs)}; "
                             "evaluation needs a classifier with one logits output.")
        logits.append(np.asarray(next(iter(outputs.values())), np.float32))
    return _summarize(np.concatenate(logits), labels)
