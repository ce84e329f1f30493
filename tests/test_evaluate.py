"""Accuracy, macro F1 and latency of Keras and TFLite classifiers."""

import numpy as np
import pytest

from tfcompress._keras import keras, tf
from tfcompress.evaluate import evaluate_keras, evaluate_tflite, latency, macro_f1
from tfcompress.export import to_tflite


def test_macro_f1_hand_computed():
    labels = [0, 0, 1, 1, 2]
    predictions = [0, 1, 1, 1, 0]
    # Class F1 = 2TP / (2TP + FP + FN): 2/4, 4/5 and 0/1.
    assert macro_f1(labels, predictions, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_macro_f1_skips_absent_class():
    assert macro_f1([0, 1], [0, 1], 3) == 1.0


@pytest.fixture(scope="module")
def selector(tmp_path_factory):
    """A 4 -> 3 linear classifier whose logits are the first three features."""
    inputs = keras.Input((4,), name="features")
    layer = keras.layers.Dense(3, name="logits")
    model = keras.Model(inputs, layer(inputs))
    layer.set_weights([np.eye(4, 3, dtype=np.float32), np.zeros(3, np.float32)])
    path = tmp_path_factory.mktemp("evaluate") / "selector.tflite"
    features = np.eye(4, dtype=np.float32)[[0, 1, 2, 2]] * 5.0
    to_tflite(model, path, verify_data=features)
    return model, str(path), features


def test_evaluate_keras_and_tflite_agree(selector):
    model, path, features = selector
    labels = np.array([0, 1, 2, 0])  # the last row predicts 2, so 3 of 4 are right
    for evaluation in (evaluate_keras(model, features, labels),
                       evaluate_tflite(path, (features, labels), num_threads=1)):
        assert evaluation.examples == 4
        assert evaluation.num_classes == 3
        assert evaluation.accuracy == pytest.approx(0.75)
        # F1: class 0 = 2/3, class 1 = 1, class 2 = 2/3.
        assert evaluation.macro_f1 == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)


def test_evaluate_dataset_batches(selector):
    model, path, features = selector
    labels = np.array([0, 1, 2, 2])
    dataset = tf.data.Dataset.from_tensor_slices(({"features": features}, labels)).batch(3)
    assert evaluate_keras(model, dataset).accuracy == 1.0
    assert evaluate_tflite(path, dataset).accuracy == 1.0


def test_evaluate_rejects_missing_labels(selector):
    _, path, features = selector
    with pytest.raises(ValueError, match="labels"):
        evaluate_tflite(path, features)


def test_latency_counts(selector):
    model, path, features = selector
    for target in (model, path):
        result = latency(target, features, runs=7, warmup=2, num_threads=1)
        assert result.runs == 7
        assert result.warmup == 2
        assert 0.0 < result.median_ms <= result.p90_ms


def test_latency_rejects_zero_runs(selector):
    _, path, features = selector
    with pytest.raises(ValueError, match="runs=0"):
        latency(path, features, runs=0)
