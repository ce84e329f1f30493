"""Tests of tfcompress.compress.structured: heads, FFN neurons and blocks really removed."""

import numpy as np
import pytest

from conftest import random_inputs
from tfcompress._keras import keras
from tfcompress.bert import build_encoder, classifier, encoder_config
from tfcompress.compress import (head_importance, neuron_importance, remove_heads,
                                 remove_layers, remove_neurons)

HIDDEN, HEAD = 32, 8  # tiny_config: hidden 32, 4 heads of 8, FFN 64, 2 blocks


@pytest.fixture
def tiny_classifier(tiny_encoder):
    return classifier(tiny_encoder, num_classes=3)


def _zero_head_output_rows(model, block, head):
    layer = model.get_layer(f"transformer/layer_{block}/attention/output")
    kernel, bias = layer.get_weights()
    kernel[head * HEAD:(head + 1) * HEAD] = 0.0
    layer.set_weights([kernel, bias])


def test_remove_dead_head_keeps_outputs(tiny_classifier):
    _zero_head_output_rows(tiny_classifier, block=1, head=2)
    inputs = random_inputs(pad_from=12)
    expected = tiny_classifier(inputs).numpy()

    small = remove_heads(tiny_classifier, {1: [2]})

    # The head contributed exactly zero; only float summation order differs.
    np.testing.assert_allclose(small(inputs).numpy(), expected, atol=1e-5)
    assert small.get_layer("transformer/layer_1/attention/core").num_heads == 3
    assert small.get_layer("transformer/layer_0/attention/core").num_heads == 4


def test_remove_head_parameter_shrink(tiny_classifier):
    small = remove_heads(tiny_classifier, {"transformer/layer_0/attention/core": [0, 3]})
    # Per head: query, key, value lose 32*8 kernel + 8 bias each; the output kernel
    # loses 8 rows of 32.
    per_head = 3 * (HIDDEN * HEAD + HEAD) + HEAD * HIDDEN
    assert per_head == 1048
    assert tiny_classifier.count_params() - small.count_params() == 2 * per_head
    assert small.get_layer("transformer/layer_0/attention/query").kernel.shape == (32, 16)
    assert encoder_config(small).layer_heads == (2, 4)


def test_remove_heads_copies_kept_slices(tiny_encoder):
    small = remove_heads(tiny_encoder, {0: [1]})
    old = tiny_encoder.get_layer("transformer/layer_0/attention/value").kernel.numpy()
    new = small.get_layer("transformer/layer_0/attention/value").kernel.numpy()
    np.testing.assert_array_equal(new, np.concatenate([old[:, :8], old[:, 16:]], axis=1))
    old = tiny_encoder.get_layer("transformer/layer_0/attention/output").kernel.numpy()
    new = small.get_layer("transformer/layer_0/attention/output").kernel.numpy()
    np.testing.assert_array_equal(new, np.concatenate([old[:8], old[16:]], axis=0))
    assert small.name == tiny_encoder.name


def test_remove_neurons_exact(tiny_classifier):
    inputs = random_inputs()
    intermediate = tiny_classifier.get_layer("transformer/layer_0/ffn/output")
    kernel, bias = intermediate.get_weights()
    kernel[[5, 9]] = 0.0  # neurons 5 and 9 feed nothing forward
    intermediate.set_weights([kernel, bias])
    expected = tiny_classifier(inputs).numpy()

    small = remove_neurons(tiny_classifier, {0: [9, 5]})

    np.testing.assert_allclose(small(inputs).numpy(), expected, atol=1e-5)
    # Per neuron: an intermediate kernel column (32) and bias (1), an output row (32).
    assert tiny_classifier.count_params() - small.count_params() == 2 * 65
    assert encoder_config(small).layer_intermediate_sizes == (62, 64)


def test_remove_neurons_fraction_by_weight(tiny_encoder):
    layer = tiny_encoder.get_layer("transformer/layer_1/ffn/intermediate")
    kernel, bias = layer.get_weights()
    kernel[:, :16] *= 1e-3  # neurons 0..15 are the weakest of block 1
    layer.set_weights([kernel, bias])
    output = tiny_encoder.get_layer("transformer/layer_1/ffn/output")
    output_kernel, output_bias = output.get_weights()
    output_kernel[:16] *= 1e-3
    output.set_weights([output_kernel, output_bias])

    small = remove_neurons(tiny_encoder, fraction=0.25, blocks=[1])

    kept = small.get_layer("transformer/layer_1/ffn/intermediate").kernel.numpy()
    np.testing.assert_array_equal(kept, kernel[:, 16:])
    assert small.get_layer("transformer/layer_0/ffn/intermediate").units == 64


def test_remove_layers_renumbers(tiny_classifier):
    inputs = random_inputs()
    small = remove_layers(tiny_classifier, [0])
    names = [layer.name for layer in small.layers]
    assert "transformer/layer_1/attention/query" not in names
    np.testing.assert_array_equal(
        small.get_layer("transformer/layer_0/ffn/output").kernel.numpy(),
        tiny_classifier.get_layer("transformer/layer_1/ffn/output").kernel.numpy())
    np.testing.assert_array_equal(small.get_layer("classifier/logits").kernel.numpy(),
                                  tiny_classifier.get_layer("classifier/logits").kernel.numpy())
    block = sum(layer.count_params() for layer in tiny_classifier.layers
                if layer.name.startswith("transformer/layer_0/"))
    assert tiny_classifier.count_params() - small.count_params() == block
    assert small(inputs).shape == (2, 3)


def test_head_importance_weight_norm(tiny_encoder):
    scores = head_importance(tiny_encoder)
    layers = {p: tiny_encoder.get_layer(f"transformer/layer_1/attention/{p}")
              for p in ("query", "key", "value", "output")}
    head = slice(16, 24)  # head 2
    total = sum(np.sum(layers[p].kernel.numpy()[:, head] ** 2) +
                np.sum(layers[p].bias.numpy()[head] ** 2) for p in ("query", "key", "value"))
    total += np.sum(layers["output"].kernel.numpy()[head] ** 2)
    assert scores[1].shape == (4,)
    np.testing.assert_allclose(scores[1][2], np.sqrt(total), rtol=1e-6)


def test_gradient_importance_zero_for_dead_head(tiny_classifier):
    _zero_head_output_rows(tiny_classifier, block=0, head=1)
    data = (random_inputs(batch=4), np.array([0, 1, 2, 0]))
    scores = head_importance(tiny_classifier, "gradient", data)
    # The dead head's q/k/v get zero gradient and its output rows are zero weights.
    assert scores[0][1] == 0.0
    assert np.all(scores[0][[0, 2, 3]] > 0)

    small = remove_heads(tiny_classifier, count=1, importance="gradient",
                         calibration_data=data, blocks=[0])
    assert small.get_layer("transformer/layer_0/attention/core").num_heads == 3
    np.testing.assert_allclose(small(data[0]).numpy(), tiny_classifier(data[0]).numpy(),
                               atol=1e-5)


def test_neuron_importance_shapes(tiny_encoder):
    scores = neuron_importance(tiny_encoder, "gradient", random_inputs())
    assert [s.shape for s in scores.values()] == [(64,), (64,)]
    assert np.all(scores[0] >= 0)


@pytest.mark.parametrize("call, message", [
    (lambda m: remove_heads(m, {0: [0, 1, 2, 3]}), "cannot remove all 4 heads of block 0"),
    (lambda m: remove_heads(m, {0: [4]}), r"indices \[4\] are out of range \[0, 3\]"),
    (lambda m: remove_heads(m, {5: [0]}), "key 5 is not a block"),
    (lambda m: remove_heads(m, {0: [0]}, fraction=0.5), "exactly one of"),
    (lambda m: remove_neurons(m, fraction=1.5), r"fraction must be in \(0, 1\); received 1.5"),
    (lambda m: remove_layers(m, [0, 1]), "leaves no block"),
    (lambda m: remove_layers(m, [2]), r"block indices \[2\] are out of range"),
    (lambda m: head_importance(m, "gradient"), "needs calibration_data"),
    (lambda m: head_importance(m, "random"), "importance must be one of"),
])
def test_invalid_arguments(tiny_encoder, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_encoder)


def test_rejects_non_encoder():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="not a tfcompress BERT encoder"):
        remove_heads(model, {0: [0]})


def test_source_not_modified(tiny_encoder):
    before = [w.copy() for w in tiny_encoder.get_weights()]
    remove_neurons(tiny_encoder, count=3)
    for old, new in zip(before, tiny_encoder.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_rebuilt_encoder_reloads(tiny_encoder, tmp_path):
    small = remove_heads(tiny_encoder, {1: [0]})
    path = str(tmp_path / "small.keras")
    small.save(path)
    reloaded = keras.models.load_model(path)
    inputs = random_inputs()
    np.testing.assert_array_equal(reloaded(inputs)["sequence_output"].numpy(),
                                  small(inputs)["sequence_output"].numpy())
    assert build_encoder(encoder_config(reloaded)).count_params() == small.count_params()
