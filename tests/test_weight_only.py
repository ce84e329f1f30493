"""Tests of tfcompress.layers.weight_only: int8 / int4 storage and its error bound."""

import os

import numpy as np
import pytest

from tfcompress._keras import keras, tf
from tfcompress.layers import base
from tfcompress.layers.quantization import BinaryWeights, quantization_notes, quantize
from tfcompress.layers.weight_only import (
    WeightOnlyQuantDense,
    WeightOnlyQuantEmbedding,
    pack_int4,
    quantize_symmetric,
    unpack_int4,
)


def _dense(units, inputs, seed=0):
    layer = keras.layers.Dense(units, kernel_initializer=keras.initializers.GlorotUniform(seed),
                               bias_initializer=keras.initializers.RandomNormal(seed=seed))
    layer(tf.zeros([1, inputs]))
    return layer


def _variable_bytes(layer):
    return sum(int(np.prod(v.shape)) * v.dtype.size for v in layer.weights)


def test_quantize_symmetric_hand_values():
    values = np.array([[0.5, -0.1], [-1.27, 0.07], [0.0, 0.0]], np.float32)
    q, scale = quantize_symmetric(values, bits=8, axis=-1)
    # Column scales: 1.27 / 127 = 0.01 and 0.1 / 127.
    np.testing.assert_allclose(scale, [0.01, 0.1 / 127], rtol=1e-6)
    np.testing.assert_array_equal(q, [[50, -127], [-127, 89], [0, 0]])
    q4, scale4 = quantize_symmetric(values, bits=4, axis=0)
    # Row scales: 0.5 / 7, 1.27 / 7, and 1 for the all-zero row.
    np.testing.assert_allclose(scale4, [0.5 / 7, 1.27 / 7, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(q4, [[7, -1], [-7, 0], [0, 0]])


def test_int4_pack_round_trip_odd_length():
    values = np.array([[-8, 7], [-1, 0], [3, -5]], np.int8)
    packed = pack_int4(values, axis=0)
    assert packed.shape == (2, 2)
    # Byte 0 of column 0: low nibble -8 (0x8), high nibble -1 (0xF) -> 0xF8 = -8 as int8.
    assert packed[0, 0] == np.int8(-8)
    np.testing.assert_array_equal(unpack_int4(packed, 3, axis=0).numpy(), values)
    np.testing.assert_array_equal(
        unpack_int4(pack_int4(values.T, axis=1), 3, axis=1).numpy(), values.T)
    with pytest.raises(ValueError, match=r"\[-9, 7\]"):
        pack_int4(np.array([-9, 7], np.int8))


@pytest.mark.parametrize("bits", [8, 4])
def test_dense_outputs_within_error_bound(bits):
    source = _dense(24, 40)
    layer = quantize(source, "weight_only", bits=bits)
    assert isinstance(layer, WeightOnlyQuantDense)
    assert layer.name == source.name
    kernel = source.kernel.numpy()
    scale = layer.kernel_scale.numpy()
    # Elementwise |W - s * Q| <= s / 2 per output column (1e-7: float32 rounding).
    error = np.abs(layer.kernel.numpy() - kernel)
    assert np.all(error <= scale / 2 + 1e-7)
    np.testing.assert_allclose(scale, np.abs(kernel).max(axis=0) / (127 if bits == 8 else 7),
                               rtol=1e-6)

    x = np.random.default_rng(1).normal(size=(5, 40)).astype(np.float32)
    difference = np.abs(layer(x).numpy() - source(x).numpy())
    # |y - y_q| <= sum_i |x_i| * s_c / 2 for each output c.
    bound = np.abs(x).sum(axis=1, keepdims=True) * scale / 2
    assert np.all(difference <= bound + 1e-5)


def test_dense_variables_bytes():
    source = _dense(256, 256)
    float_bytes = _variable_bytes(source)
    assert float_bytes == 256 * 256 * 4 + 256 * 4
    int8 = quantize(source, "weight_only", bits=8)
    int4 = quantize(source, "weight_only", bits=4)
    assert int8.quantized_kernel.dtype == tf.int8
    assert not int8.quantized_kernel.trainable
    # int8 kernel + float32 scales + float32 bias.
    assert _variable_bytes(int8) == 256 * 256 + 256 * 4 + 256 * 4
    assert int8.compressed_bytes() == _variable_bytes(int8)
    # Two int4 values per byte.
    assert int4.quantized_kernel.shape == (128, 256)
    assert _variable_bytes(int4) == 128 * 256 + 256 * 4 + 256 * 4
    assert _variable_bytes(int8) / float_bytes == pytest.approx(0.2568, abs=1e-4)
    assert _variable_bytes(int4) / float_bytes == pytest.approx(0.1323, abs=1e-4)
    assert int4.parameter_count() == 256 * 256 + 2 * 256


@pytest.mark.parametrize("bits", [8, 4])
def test_embedding_lookup_matches_dequantized_table(bits):
    source = keras.layers.Embedding(50, 9)
    source(tf.zeros([1, 2], tf.int32))
    layer = quantize(source, "weight_only", bits=bits)
    assert isinstance(layer, WeightOnlyQuantEmbedding)
    table = source.embeddings.numpy()
    scale = layer.kernel_scale.numpy()
    assert scale.shape == (50,)
    error = np.abs(layer.embeddings.numpy() - table)
    assert np.all(error <= scale[:, None] / 2 + 1e-7)
    ids = np.array([[0, 7, 49], [3, 3, 12]], np.int32)
    np.testing.assert_array_equal(layer(ids).numpy(), layer.embeddings.numpy()[ids])
    columns = 9 if bits == 8 else 5
    assert _variable_bytes(layer) == 50 * columns + 50 * 4


def test_weight_only_from_compressed_dense_uses_effective_kernel():
    source = base.CompressedDense(3, kernel_transforms=[BinaryWeights()])
    source(tf.zeros([1, 4]))
    layer = quantize(source, "weight_only", bits=8)
    effective = source.effective_kernel("kernel").numpy()
    # Binary kernels have one magnitude per column, which int8 stores exactly.
    np.testing.assert_allclose(layer.kernel.numpy(), effective, rtol=1e-6)
    assert quantization_notes(layer) == "int8 weights stored, float compute (weight-only)"


def test_weight_only_arguments_rejected():
    with pytest.raises(ValueError, match="bits=3"):
        WeightOnlyQuantDense(4, bits=3)
    with pytest.raises(ValueError, match="units must be a positive integer; received 0"):
        WeightOnlyQuantDense(0)
    with pytest.raises(ValueError, match="output_dim"):
        WeightOnlyQuantEmbedding(10, -1)
    low_rank = base.LowRankDense(4, rank=2)
    low_rank(tf.zeros([1, 6]))
    with pytest.raises(NotImplementedError, match="LowRankDense"):
        quantize(low_rank, "weight_only")
    layer = WeightOnlyQuantDense(4)
    layer(tf.zeros([1, 3]))
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        layer.set_float_weights(np.zeros([4, 4]))


def test_mixed_precision_computes_in_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    layer = quantize(_dense(4, 3), "weight_only", bits=4)
    outputs = layer(tf.ones([2, 3]))
    assert outputs.dtype == tf.float16
    assert layer.kernel_scale.dtype == tf.float32


def test_serialization_round_trips(tmp_path):
    ids = keras.Input((None,), dtype=tf.int32)
    embedding = keras.layers.Embedding(30, 8, name="embedding")
    dense = keras.layers.Dense(5, name="dense")
    float_model = keras.Model(ids, dense(embedding(ids)))
    model = keras.Model(ids, quantize(dense, "weight_only", bits=4)(
        quantize(embedding, "weight_only", bits=8)(ids)))
    x = np.array([[1, 2, 29], [0, 5, 5]], np.int32)
    expected = model(x).numpy()
    # int8 table and int4 kernel: close to, not equal to, the float model.
    assert np.abs(expected - float_model(x).numpy()).max() < 0.05

    rebuilt = keras.Model.from_config(model.get_config())
    rebuilt.set_weights(model.get_weights())
    np.testing.assert_array_equal(rebuilt(x).numpy(), expected)

    keras_path = os.path.join(tmp_path, "model.keras")
    model.save(keras_path)
    reloaded = keras.models.load_model(keras_path)
    np.testing.assert_array_equal(reloaded(x).numpy(), expected)
    assert reloaded.get_layer("dense").quantized_kernel.dtype == tf.int8

    saved_path = os.path.join(tmp_path, "saved")
    model.save(saved_path, save_format="tf")
    reloaded = keras.models.load_model(saved_path)
    np.testing.assert_array_equal(reloaded(x).numpy(), expected)
