"""Tests of tfcompress.layers.quantization: QAT, binary and ternary weights, quantize()."""

import os

import numpy as np
import pytest

from tfcompress._keras import keras, tf
from tfcompress.bert import AttentionCore, build_encoder, classifier
from tfcompress.layers import base
from tfcompress.layers.quantization import (
    ActivationQuantizer,
    BinaryWeights,
    FakeQuant,
    QuantizedAttentionCore,
    TernaryWeights,
    calibrate,
    quantization_notes,
    quantize,
)

from conftest import random_inputs

# Hand-made kernel [3 inputs, 2 outputs] for the binary and ternary cases.
SMALL_KERNEL = np.array([[1.0, -2.0], [-3.0, 0.5], [0.2, 4.0]], np.float32)


def _built_dense(units, inputs, seed=0, activation=None):
    layer = keras.layers.Dense(units, activation=activation,
                               kernel_initializer=keras.initializers.GlorotUniform(seed),
                               bias_initializer=keras.initializers.RandomNormal(seed=seed))
    layer(tf.zeros([1, inputs]))
    return layer


def _kernel_layer_with(transform, kernel):
    layer = base.CompressedDense(kernel.shape[1], kernel_transforms=[transform])
    layer(tf.zeros([1, kernel.shape[0]]))
    layer.kernel.assign(kernel)
    return layer


# ---- weight transforms ------------------------------------------------------------------

def test_fake_quant_per_tensor_hand_values():
    # max |W| = 1.27, so the 8-bit narrow-range step is 1.27 / 127 = 0.01.
    kernel = np.array([[0.123, -0.456], [1.27, 0.0049]], np.float32)
    layer = _kernel_layer_with(FakeQuant(per_channel=False), kernel)
    expected = np.array([[0.12, -0.46], [1.27, 0.0]], np.float32)
    # 1e-6: float32 rounding of the step 0.01.
    np.testing.assert_allclose(layer.effective_kernel("kernel").numpy(), expected, atol=1e-6)


def test_fake_quant_per_channel_hand_values():
    # Column steps: 1.27 / 127 = 0.01 and 0.254 / 127 = 0.002.
    kernel = np.array([[0.123, 0.0031], [-1.27, -0.254]], np.float32)
    layer = _kernel_layer_with(FakeQuant(per_channel=True), kernel)
    expected = np.array([[0.12, 0.004], [-1.27, -0.254]], np.float32)
    np.testing.assert_allclose(layer.effective_kernel("kernel").numpy(), expected, atol=1e-6)


def test_fake_quant_error_bound_and_levels():
    kernel = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    layer = _kernel_layer_with(FakeQuant(per_channel=True), kernel)
    quantized = layer.effective_kernel("kernel").numpy()
    step = np.abs(kernel).max(axis=0) / 127
    # Rounding error is at most half a step per channel (plus float32 slack).
    assert np.all(np.abs(quantized - kernel) <= step / 2 + 1e-6)
    for column in range(8):
        assert len(np.unique(quantized[:, column])) <= 255


def test_fake_quant_gradient_is_straight_through():
    kernel = tf.Variable(np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32))
    transform = FakeQuant(per_channel=False)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(transform(kernel, True) * 3.0)
    np.testing.assert_array_equal(tape.gradient(loss, kernel).numpy(), np.full((5, 3), 3.0))


def test_binary_weights_hand_values():
    layer = _kernel_layer_with(BinaryWeights(), SMALL_KERNEL)
    # Column means of |W|: (1 + 3 + 0.2) / 3 = 1.4 and (2 + 0.5 + 4) / 3 = 6.5 / 3.
    a, b = 1.4, 6.5 / 3
    expected = np.array([[a, -b], [-a, b], [a, b]], np.float32)
    np.testing.assert_allclose(layer.effective_kernel("kernel").numpy(), expected, rtol=1e-6)


def test_ternary_weights_hand_values():
    layer = _kernel_layer_with(TernaryWeights(threshold=0.7), SMALL_KERNEL)
    # Column 0: delta = 0.7 * 1.4 = 0.98 keeps 1 and -3, alpha = 2.
    # Column 1: delta = 0.7 * 6.5 / 3 = 1.517 keeps -2 and 4, alpha = 3.
    expected = np.array([[2.0, -3.0], [-2.0, 0.0], [0.0, 3.0]], np.float32)
    np.testing.assert_allclose(layer.effective_kernel("kernel").numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("transform", [BinaryWeights(), TernaryWeights()])
def test_binary_ternary_gradients_flow(transform):
    layer = _kernel_layer_with(transform, SMALL_KERNEL)
    x = tf.constant([[1.0, 2.0, 3.0]])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x))
    gradient = tape.gradient(loss, layer.kernel).numpy()
    # Straight-through: d loss / d W[i, c] = x_i for every weight, zeroed ones included.
    np.testing.assert_allclose(gradient, np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))


def test_binary_ternary_strip_folds_values():
    for transform in (BinaryWeights(), TernaryWeights()):
        layer = _kernel_layer_with(transform, SMALL_KERNEL)
        expected = layer.effective_kernel("kernel").numpy()
        stripped = layer.strip()
        assert isinstance(stripped, keras.layers.Dense)
        np.testing.assert_array_equal(stripped.kernel.numpy(), expected)


def test_transform_arguments_rejected():
    with pytest.raises(ValueError, match="bits=9"):
        FakeQuant(bits=9)
    with pytest.raises(TypeError, match="per_channel"):
        FakeQuant(per_channel="yes")
    with pytest.raises(ValueError, match="threshold=-0.5"):
        TernaryWeights(threshold=-0.5)
    with pytest.raises(ValueError, match="axis=2"):
        _kernel_layer_with(FakeQuant(axis=2), SMALL_KERNEL)


# ---- activation quantizer ---------------------------------------------------------------

def test_activation_quantizer_moving_average():
    quantizer = ActivationQuantizer(momentum=0.9)
    first = tf.constant([[-1.0, 2.0]])
    second = tf.constant([[-3.0, 1.0]])
    # No range yet: inference passes the input through.
    unset = tf.constant([[0.123]])
    np.testing.assert_array_equal(quantizer(unset, training=False).numpy(), unset.numpy())
    quantizer(first, training=True)
    assert quantizer.current_range() == (-1.0, 2.0)
    quantizer(second, training=True)
    low, high = quantizer.current_range()
    assert low == pytest.approx(0.9 * -1.0 + 0.1 * -3.0)
    assert high == pytest.approx(0.9 * 2.0 + 0.1 * 1.0)
    assert int(quantizer.range_updates.numpy()) == 2
    # Inference leaves the range alone.
    quantizer(tf.constant([[-100.0, 100.0]]), training=False)
    assert quantizer.current_range() == pytest.approx((low, high))


def test_activation_quantizer_range_contains_zero():
    quantizer = ActivationQuantizer()
    quantizer(tf.constant([[1.0, 3.0]]), training=True)
    assert quantizer.current_range() == (0.0, 3.0)
    # Step 3 / 255: 1.0 rounds to 85 * 3 / 255 = 1.0; 0.5 rounds to 43 steps.
    outputs = quantizer(tf.constant([[1.0, 0.5]]), training=False).numpy()
    np.testing.assert_allclose(outputs, [[1.0, 43 * 3 / 255]], atol=1e-6)


def test_activation_quantizer_arguments_rejected():
    with pytest.raises(ValueError, match="momentum=1.5"):
        ActivationQuantizer(momentum=1.5)
    with pytest.raises(ValueError, match="initial_range"):
        ActivationQuantizer(learn_range=False)
    with pytest.raises(ValueError, match=r"initial_range=\[1.0, 2.0\]"):
        ActivationQuantizer(initial_range=[1.0, 2.0])


def test_calibrate_sets_min_and_max_over_batches():
    layer = quantize(_built_dense(4, 3), "qat")
    data = tf.data.Dataset.from_tensor_slices(
        np.array([[[-1.0, 0.5, 2.0]], [[-4.0, 0.0, 1.0]]], np.float32))
    assert calibrate(layer, data) == 1
    assert layer.input_quantizer.current_range() == (-4.0, 2.0)


# ---- quantize() ---------------------------------------------------------------------------

def test_quantize_dense_qat_structure():
    source = _built_dense(4, 3)
    x = np.random.default_rng(2).normal(size=(6, 3)).astype(np.float32)
    layer = quantize(source, "qat", calibration_inputs=x)
    assert isinstance(layer, base.CompressedDense)
    assert layer.name == source.name
    assert [type(t) for t in layer.transforms["kernel"]] == [FakeQuant]
    assert layer.transforms["kernel"][0].per_channel is False
    assert isinstance(layer.input_quantizer, ActivationQuantizer)
    assert layer.input_quantizer.current_range() == (float(x.min()), float(x.max()))
    np.testing.assert_array_equal(layer.kernel.numpy(), source.kernel.numpy())
    # The source keeps its type and weights.
    assert type(source) is keras.layers.Dense
    # 8-bit inputs and weights of unit-scale data: outputs agree to about 1%.
    np.testing.assert_allclose(layer(x).numpy(), source(x).numpy(), atol=0.05)


def test_quantize_keeps_pruning_mask_before_fake_quant():
    from tfcompress.layers.pruning import prune

    pruned = prune(_built_dense(8, 16), sparsity=0.5)
    layer = quantize(pruned, "qat")
    names = [type(t).__name__ for t in layer.transforms["kernel"]]
    assert names == ["PruningMask", "FakeQuant"]
    effective = layer.effective_kernel("kernel").numpy()
    assert int(np.sum(effective == 0.0)) >= 64


def test_quantize_low_rank_both_factors():
    source = base.LowRankDense(6, rank=2)
    source(tf.zeros([1, 5]))
    layer = quantize(source, "ternary")
    assert [type(t) for t in layer.transforms["kernel_a"]] == [TernaryWeights]
    assert [type(t) for t in layer.transforms["kernel_b"]] == [TernaryWeights]
    layer = quantize(source, "qat")
    assert [type(t) for t in layer.transforms["kernel_b"]] == [FakeQuant]


def test_quantize_rejects_bad_requests():
    dense = _built_dense(4, 3)
    with pytest.raises(ValueError, match="bits=4"):
        quantize(dense, "qat", bits=4)
    with pytest.raises(ValueError, match="bits=2"):
        quantize(dense, "weight_only", bits=2)
    with pytest.raises(ValueError, match="mode='int3'"):
        quantize(dense, "int3")
    with pytest.raises(ValueError, match="bits must be None"):
        quantize(dense, "binary", bits=1)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(quantize(dense, "qat"), "binary")
    conv = keras.layers.Conv1D(2, 3)
    conv(tf.zeros([1, 5, 2]))
    with pytest.raises(TypeError, match="Conv1D"):
        quantize(conv, "qat")
    with pytest.raises(ValueError, match="must be built"):
        quantize(keras.layers.Dense(3), "qat")
    core = AttentionCore(2, 4)
    core.build(None)
    with pytest.raises(ValueError, match="mode='binary'"):
        quantize(core, "binary")


def test_layer_norm_kept_in_float():
    norm = keras.layers.LayerNormalization()
    norm(tf.zeros([1, 4]))
    assert quantize(norm, "qat") is norm
    assert quantization_notes(norm) == "kept in float32 (LayerNormalization)"


def test_quantize_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    layer = quantize(_built_dense(4, 3), "qat")
    x = tf.random.normal([2, 3])
    layer(x, training=True)
    outputs = layer(x)
    assert outputs.dtype == tf.float16
    assert layer.kernel.dtype == tf.float32
    assert layer.input_quantizer.range_min.dtype == tf.float32


# ---- attention -----------------------------------------------------------------------------

def _attention_inputs(seed=0):
    rng = np.random.default_rng(seed)
    query, key, value = (rng.normal(size=(2, 5, 8)).astype(np.float32) for _ in range(3))
    mask = np.ones((2, 5), np.float32)
    mask[1, 3:] = 0
    return [query, key, value, mask]


def test_quantized_attention_core_close_to_float():
    core = AttentionCore(2, 4)
    inputs = _attention_inputs()
    expected = core(inputs).numpy()
    quantized = quantize(core, "qat", calibration_inputs=inputs)
    assert isinstance(quantized, QuantizedAttentionCore)
    assert sorted(quantized.quantizers) == ["key", "probs", "query", "value"]
    low, high = quantized.quantizers["probs"].current_range()
    assert low == 0.0
    assert high <= 1.0
    outputs = quantized(inputs).numpy()
    # 8-bit Q, K, V (range about 6) and probabilities: per-element error about 1e-2.
    assert np.abs(outputs - expected).max() < 0.05
    assert 0 < np.abs(outputs - expected).max()
    assert quantization_notes(quantized) == (
        "int8 inputs to both attention matmuls; softmax in float32")


def test_quantized_attention_core_softmax_option_and_strip():
    core = AttentionCore(2, 4)
    inputs = _attention_inputs()
    core(inputs)
    quantized = quantize(core, "qat", quantize_softmax=True, calibration_inputs=inputs)
    assert "scores" in quantized.quantizers
    stripped = quantized.strip()
    for name, quantizer in stripped.quantizers.items():
        assert quantizer.learn_range is False
        assert quantizer.initial_range == pytest.approx(
            quantized.quantizers[name].current_range())
    np.testing.assert_array_equal(stripped(inputs).numpy(), quantized(inputs).numpy())


# ---- strip ---------------------------------------------------------------------------------

def test_strip_keeps_fake_quant_and_ranges_without_counters():
    x = np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32)
    layer = quantize(_built_dense(4, 3), "qat", calibration_inputs=x)
    stripped = base.strip_layer(layer)
    assert [type(t) for t in stripped.transforms["kernel"]] == [FakeQuant]
    names = [v.name for v in stripped.weights]
    assert not any("range_updates" in name for name in names)
    assert stripped.input_quantizer.current_range() == layer.input_quantizer.current_range()
    np.testing.assert_array_equal(stripped(x).numpy(), layer(x).numpy())


def test_strip_without_range_warns_and_drops_quantizer():
    layer = quantize(_built_dense(4, 3), "qat")
    with pytest.warns(UserWarning, match="never saw data"):
        stripped = base.strip_layer(layer)
    assert stripped.input_quantizer is None


# ---- serialization ---------------------------------------------------------------------------

def _mixed_model():
    inputs = keras.Input((5, 8))
    mask = keras.Input((5,))
    projections = [quantize(_built_dense(8, 8, seed=i), "qat") for i in range(3)]
    q, k, v = (p(inputs) for p in projections)
    core = AttentionCore(2, 4, name="core")
    core.build(None)
    context = quantize(core, "qat")([q, k, v, mask])
    binary = quantize(_built_dense(6, 8, seed=5), "binary")
    low_rank = base.LowRankDense(3, rank=2, name="low_rank")
    low_rank(tf.zeros([1, 6]))
    ternary = quantize(low_rank, "ternary")
    return keras.Model([inputs, mask], ternary(binary(context)))


def test_serialization_round_trips(tmp_path):
    model = _mixed_model()
    query, _, _, mask = _attention_inputs()
    calibrate(model, [query, mask])
    expected = model([query, mask]).numpy()

    rebuilt = keras.Model.from_config(model.get_config())
    rebuilt.set_weights(model.get_weights())
    np.testing.assert_array_equal(rebuilt([query, mask]).numpy(), expected)

    keras_path = os.path.join(tmp_path, "model.keras")
    model.save(keras_path)
    reloaded = keras.models.load_model(keras_path)
    np.testing.assert_array_equal(reloaded([query, mask]).numpy(), expected)
    assert isinstance(reloaded.get_layer("core"), QuantizedAttentionCore)

    saved_path = os.path.join(tmp_path, "saved")
    model.save(saved_path, save_format="tf")
    reloaded = keras.models.load_model(saved_path)
    np.testing.assert_array_equal(reloaded([query, mask]).numpy(), expected)


# ---- TFLite conversion ---------------------------------------------------------------------

def _convert(model, representative=None, signature=None):
    if signature is None:
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
    else:
        converter = tf.lite.TFLiteConverter.from_concrete_functions(
            [signature.get_concrete_function()], model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if representative is not None:
        converter.representative_dataset = representative
    return converter.convert()


def _matmul_operand_dtypes(interpreter, op_names=("FULLY_CONNECTED",)):
    tensors = {d["index"]: d for d in interpreter.get_tensor_details()}
    found = []
    for op in interpreter._get_ops_details():
        if op["op_name"] in op_names:
            found.append((op["op_name"],
                          [tensors[i]["dtype"] for i in op["inputs"][:2]],
                          tensors[op["outputs"][0]]["dtype"]))
    return found, tensors


def test_tflite_qat_dense_has_int8_kernels():
    from ai_edge_litert.interpreter import Interpreter

    first = quantize(_built_dense(32, 16, seed=1, activation="relu"), "qat")
    second = quantize(_built_dense(4, 32, seed=2), "qat")
    inputs = keras.Input((16,))
    outputs = ActivationQuantizer(name="output_quantizer")(second(first(inputs)))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(4).normal(size=(8, 16)).astype(np.float32)
    calibrate(model, x)

    interpreter = Interpreter(model_content=_convert(model))
    interpreter.allocate_tensors()
    ops, tensors = _matmul_operand_dtypes(interpreter)
    assert len(ops) == 2
    for _, operands, output in ops:
        assert operands == [np.int8, np.int8]
        assert output == np.int8
    float_constants = [d["name"] for d in tensors.values()
                       if len(d["shape"]) >= 2 and d["dtype"] == np.float32
                       and not d["name"].startswith(("serving_default", "StatefulPartitioned"))]
    assert float_constants == []

    # The int8 kernels, stored [out, in], have the QAT scale max |W| / 127 (per tensor).
    for layer, shape in ((first, [32, 16]), (second, [4, 32])):
        kernel = [d for d in tensors.values()
                  if d["dtype"] == np.int8 and list(d["shape"]) == shape]
        assert len(kernel) == 1
        scales = kernel[0]["quantization_parameters"]["scales"]
        expected = np.abs(layer.kernel.numpy()).max() / 127
        np.testing.assert_allclose(scales, np.full_like(scales, expected), rtol=1e-5)

    runner = interpreter.get_signature_runner()
    input_name = list(runner.get_input_details())[0]
    tflite = np.concatenate(
        [list(runner(**{input_name: x[i:i + 1]}).values())[0] for i in range(8)])
    keras_outputs = model(x).numpy()
    low, high = model.get_layer("output_quantizer").current_range()
    step = (high - low) / 255
    # Both compute with the same int8 levels; TFLite's int32 bias and its requantization
    # of the hidden and output tensors round differently, by at most two output steps.
    assert np.abs(tflite - keras_outputs).max() <= 2 * step


@pytest.mark.slow
def test_tflite_qat_bert_matmuls_are_int8(tiny_config):
    from ai_edge_litert.interpreter import Interpreter

    model = classifier(build_encoder(tiny_config), 3, dropout=0.0)
    quantized = keras.models.clone_model(model, clone_function=_quantize_projection)
    data = random_inputs(batch=4, seq=16, pad_from=12)
    calibrate(quantized, data)

    @tf.function(input_signature=[{name: tf.TensorSpec([1, 16], tf.int32, name=name)
                                   for name in data}])
    def serve(inputs):
        return quantized(inputs, training=False)

    def representative():
        for i in range(4):
            yield {name: value[i:i + 1] for name, value in data.items()}

    interpreter = Interpreter(model_content=_convert(quantized, representative, serve))
    ops, _ = _matmul_operand_dtypes(interpreter, ("FULLY_CONNECTED", "BATCH_MATMUL"))
    # Per block: 6 projections and 2 attention matmuls; then the pooler and the logits.
    assert len(ops) == 2 * 8 + 2
    for name, operands, _ in ops:
        assert operands == [np.int8, np.int8], name


# ---- tiny BERT -----------------------------------------------------------------------------

def _quantize_projection(layer):
    if isinstance(layer, (keras.layers.Dense, AttentionCore)):
        return quantize(layer, "qat")
    return layer


def test_qat_tiny_bert_close_to_float(tiny_config):
    model = classifier(build_encoder(tiny_config), 3, dropout=0.0)
    quantized = keras.models.clone_model(model, clone_function=_quantize_projection)
    kinds = [type(layer).__name__ for layer in quantized.layers]
    # 2 blocks x 6 projections + pooler + logits; 2 attention cores.
    assert kinds.count("CompressedDense") == 14
    assert kinds.count("QuantizedAttentionCore") == 2
    notes = [quantization_notes(layer) for layer in quantized.layers
             if isinstance(layer, keras.layers.LayerNormalization)]
    assert notes == ["kept in float32 (LayerNormalization)"] * 5

    calibrate(quantized, random_inputs(batch=8, seq=16, pad_from=12))
    test = random_inputs(batch=8, seq=16, seed=1, pad_from=10)
    expected = model(test).numpy()
    outputs = quantized(test).numpy()
    relative = np.linalg.norm(outputs - expected) / np.linalg.norm(expected)
    assert relative < 0.05
    assert relative > 0  # fake quant is active
