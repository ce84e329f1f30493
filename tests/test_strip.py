"""Tests of tfcompress.compress.strip: inference copies without training-only state."""

import os

import numpy as np
import pytest

from conftest import random_inputs
from tfcompress._keras import keras
from tfcompress.bert import classifier
from tfcompress.compress import compress, strip
from tfcompress.compress.strip import TRAINING_ONLY_NAMES


@pytest.fixture
def pruned(tiny_encoder):
    model = classifier(tiny_encoder, num_classes=3)
    recipe = {"compress": [
        {"type": "Dense", "match": r"transformer/.*",
         "prune": {"sparsity": 0.5, "schedule": "constant", "begin_step": 0,
                   "end_step": 10, "frequency": 1}},
    ]}
    new, _ = compress(model, recipe)
    return model, new


def test_strip_removes_training_state(pruned):
    _, new = pruned
    assert any("mask" in v.name for v in new.weights)
    stripped = strip(new)
    names = [v.name for v in stripped.weights]
    for word in TRAINING_ONLY_NAMES:
        assert not [n for n in names if word in n], word
    assert stripped.optimizer is None
    assert type(stripped.get_layer("transformer/layer_0/ffn/output")) is keras.layers.Dense


def test_strip_keeps_zeros_and_outputs(tiny_encoder):
    model = classifier(tiny_encoder, num_classes=3)
    recipe = {"compress": [{"type": "Dense", "prune": {"sparsity": 0.75}}]}
    new, _ = compress(model, recipe)
    stripped = strip(new)

    layer = new.get_layer("transformer/layer_1/attention/value")
    expected = layer.effective_kernel("kernel", training=False).numpy()
    kernel = stripped.get_layer("transformer/layer_1/attention/value").kernel.numpy()
    np.testing.assert_array_equal(kernel, expected)
    assert int(np.sum(kernel == 0)) == 32 * 32 * 3 // 4
    inputs = random_inputs()
    # The stripped Dense multiplies the folded kernel; only summation order differs.
    np.testing.assert_allclose(stripped(inputs).numpy(), new(inputs, training=False).numpy(),
                               atol=1e-6)


def test_stripped_size_close_to_dense(pruned, tmp_path):
    dense, new = pruned
    dense_path = str(tmp_path / "dense.keras")
    stripped_path = str(tmp_path / "stripped.keras")
    dense.save(dense_path)
    strip(new).save(stripped_path)
    dense_size = os.path.getsize(dense_path)
    stripped_size = os.path.getsize(stripped_path)
    assert stripped_size <= dense_size * 1.02, (stripped_size, dense_size)


def test_strip_does_not_modify_source(pruned):
    _, new = pruned
    before = [w.numpy().copy() for w in new.weights]
    strip(new)
    for old, variable in zip(before, new.weights):
        np.testing.assert_array_equal(old, variable.numpy())


def test_strip_plain_model_is_copy():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="d")(inputs * 2.0))
    stripped = strip(model)
    assert stripped.get_layer("d") is not model.get_layer("d")
    x = np.ones((1, 4), np.float32)
    np.testing.assert_array_equal(stripped(x).numpy(), model(x).numpy())


def test_strip_rejects_non_model():
    with pytest.raises(TypeError, match="must be a tf_keras Model"):
        strip(keras.layers.Dense(2))


def test_fold_quantization_leaves_float_graph(tiny_encoder):
    from tfcompress.bert import AttentionCore
    from tfcompress.compress import Recipe
    from tfcompress.layers import QuantizedAttentionCore, calibrate

    model = classifier(tiny_encoder, num_classes=3)
    recipe = Recipe.from_dict({"compress": [
        {"match": r"transformer/layer_\d+/ffn/(intermediate|output)",
         "prune": {"sparsity": 0.5}, "quantize": {"mode": "qat", "bits": 8}},
        {"match": r"transformer/layer_\d+/attention/core", "quantize": {"mode": "qat"}}]})
    inputs = random_inputs(batch=8, seq=12)
    qat, _ = compress(model, recipe, calibration_data=inputs)
    calibrate(qat, inputs)

    folded = strip(qat, fold_quantization=True)
    layers = {layer.name: layer for layer in folded.layers}
    core = layers["transformer/layer_0/attention/core"]
    assert type(core) is AttentionCore
    assert not isinstance(core, QuantizedAttentionCore)
    dense = layers["transformer/layer_0/ffn/intermediate"]
    assert type(dense) is keras.layers.Dense
    # The stored kernel is the effective one: pruned (exactly half zeros) and on the
    # int8 grid of the fake quantization, so at most 255 distinct values.
    source = {layer.name: layer for layer in qat.layers}["transformer/layer_0/ffn/intermediate"]
    expected = source.effective_kernel("kernel", training=False).numpy()
    np.testing.assert_array_equal(dense.kernel.numpy(), expected)
    assert np.mean(dense.kernel.numpy() == 0) == 0.5
    assert len(np.unique(dense.kernel.numpy())) <= 255
    names = [w.name for w in folded.weights]
    assert not [n for n in names if "range" in n or "quantizer" in n or "mask" in n]
