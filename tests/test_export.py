"""TFLite export: modes, fixed signature, builtin-op check, atomic write, verification."""

import os

import numpy as np
import pytest

from conftest import random_inputs
from tfcompress._keras import keras, tf
from tfcompress.bert import BertConfig, build_encoder, classifier
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter
from tfcompress.export import (MODES, Tolerance, UnsupportedOpError, VerificationError,
                               check_builtin_ops, flatbuffer, to_tflite, weight_stats)
from tfcompress.export.tflite import INT8_FLOAT_STAGES, run_tflite


@pytest.fixture(scope="module")
def tiny_classifier():
    config = BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64, max_position_embeddings=64,
                        dropout_rate=0.0, attention_dropout_rate=0.0)
    keras.utils.set_random_seed(7)
    model = classifier(build_encoder(config), num_classes=3, dropout=0.0)
    # Larger logits weights give clear argmax margins, so label agreement of the
    # quantized modes measures quantization error rather than near-ties.
    logits = model.get_layer("classifier/logits")
    kernel, bias = logits.get_weights()
    logits.set_weights([kernel * 50.0, bias])
    return model


@pytest.fixture(scope="module")
def data():
    return random_inputs(batch=8, seq=16)


def _operator_inputs(path):
    """Return ``(operator name, [(shape, TensorType) of each input])`` per operator node."""
    with open(path, "rb") as f:
        content = f.read()
    subgraph = flatbuffer.read_model(content).Subgraphs(0)
    names = flatbuffer.operator_names(content)
    rows = []
    for o in range(subgraph.OperatorsLength()):
        op = subgraph.Operators(o)
        inputs = []
        for index in op.InputsAsNumpy().tolist():
            # -1 marks an omitted optional input, such as a missing bias.
            tensor = subgraph.Tensors(index) if index >= 0 else None
            inputs.append(None if tensor is None
                          else (tuple(tensor.ShapeAsNumpy()), tensor.Type()))
        rows.append((names[op.OpcodeIndex()], inputs))
    return rows


def test_float32_result_fields(tiny_classifier, data, tmp_path):
    path = tmp_path / "model.tflite"
    result = to_tflite(tiny_classifier, path, verify_data=data)
    assert result.bytes == os.path.getsize(path)
    assert 0 < result.gzip_bytes < result.bytes
    assert result.seq_length == 16
    assert result.fixed_sequence_length
    assert result.batch_size == 1
    assert result.inputs == (("input_mask", "int32", (1, 16)),
                             ("input_type_ids", "int32", (1, 16)),
                             ("input_word_ids", "int32", (1, 16)))
    assert result.outputs == ("classifier_logits",)
    assert result.verification.examples == 8
    # float32 TFLite kernels differ from TensorFlow's by summation order only.
    assert result.verification.max_abs_diff <= 1e-4
    assert result.verification.label_agreement == 1.0
    assert "GELU" in result.operators
    assert not any(op.startswith("custom:") for op in result.operators)
    assert result.sparsity == 0.0
    assert os.listdir(tmp_path) == ["model.tflite"]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_modes_verify(tiny_classifier, data, tmp_path, mode):
    # Random tiny weights give near-tied logits across examples, so the int4 check
    # here is on direction only; label agreement is reported, not asserted.
    tolerance = Tolerance(min_cosine=0.98, min_label_agreement=0.875) if mode == "int8" \
        else Tolerance(min_cosine=0.95)
    result = to_tflite(tiny_classifier, tmp_path / f"{mode}.tflite", mode=mode,
                       representative_data=data, verify_data=data, tolerance=tolerance)
    verification = result.verification
    assert verification.cosine >= tolerance.min_cosine
    assert 0.0 <= verification.label_agreement <= 1.0
    if mode == "int8":
        # Token ids stay int32 and the logits come out as float32.
        assert all(dtype == "int32" for _, dtype, _ in result.inputs)
        assert "QUANTIZE" in result.operators
        assert "DEQUANTIZE" in result.operators


def test_verification_failure_leaves_nothing(tiny_classifier, data, tmp_path):
    path = tmp_path / "strict.tflite"
    with pytest.raises(VerificationError) as error:
        to_tflite(tiny_classifier, path, mode="dynamic", verify_data=data,
                  tolerance=Tolerance(max_abs_diff=0.0))
    assert not path.exists()
    assert os.listdir(tmp_path) == []
    message = str(error.value)
    assert "max abs diff" in message
    assert "Layers with the largest error" in message
    assert len(error.value.layer_errors) >= 1


def test_size_ratios_hidden_256(tmp_path):
    config = BertConfig(vocab_size=1000, hidden_size=256, num_layers=2, num_heads=4,
                        intermediate_size=1024, max_position_embeddings=64,
                        dropout_rate=0.0, attention_dropout_rate=0.0)
    model = classifier(build_encoder(config), num_classes=3, dropout=0.0)
    inputs = random_inputs(batch=4, seq=16, vocab=1000)
    sizes = {}
    for mode in ("float32", "float16", "dynamic"):
        sizes[mode] = to_tflite(model, tmp_path / f"{mode}.tflite", mode=mode,
                                verify_data=inputs).bytes
    assert sizes["dynamic"] <= 0.35 * sizes["float32"]
    assert sizes["float16"] <= 0.55 * sizes["float32"]


def _dense_512(sparsity=None):
    inputs = keras.Input((512,))
    outputs = keras.layers.Dense(512, name="dense")(inputs)
    model = keras.Model(inputs, outputs)
    if sparsity is not None:
        kernel, bias = model.get_layer("dense").get_weights()
        threshold = np.quantile(np.abs(kernel), sparsity)
        kernel[np.abs(kernel) <= threshold] = 0.0
        model.get_layer("dense").set_weights([kernel, bias])
    return model


def test_pruned_dense_sizes(tmp_path):
    data = np.random.default_rng(0).normal(size=(4, 512)).astype(np.float32)
    dense = to_tflite(_dense_512(), tmp_path / "dense.tflite", verify_data=data)
    pruned_model = _dense_512(sparsity=0.8)
    pruned = to_tflite(pruned_model, tmp_path / "pruned.tflite", verify_data=data)
    encoded = to_tflite(pruned_model, tmp_path / "sparse.tflite", verify_data=data,
                        sparse=True)
    # Zeros stored densely take the same bytes, so only gzip shrinks them.
    assert abs(pruned.bytes - dense.bytes) <= 0.02 * dense.bytes
    assert pruned.gzip_bytes <= 0.45 * dense.gzip_bytes
    assert encoded.bytes < dense.bytes
    assert encoded.sparse_tensors == 1
    assert pruned.sparsity == pytest.approx(0.8, abs=1e-3)
    assert encoded.sparsity == pytest.approx(0.8, abs=1e-3)
    assert dense.sparsity == 0.0
    assert pruned.seq_length is None
    assert not pruned.fixed_sequence_length


def test_float16_large_negative_mask(tmp_path):
    ids = keras.Input((8,), dtype=tf.int32, name="ids")
    mask = keras.Input((8,), dtype=tf.int32, name="mask")
    x = keras.layers.Embedding(50, 16)(ids)
    scores = keras.layers.Dense(1)(x)[..., 0]
    bias = (1.0 - tf.cast(mask, tf.float32)) * -1e9
    weights = tf.nn.softmax(scores + bias, axis=-1)
    pooled = tf.reduce_sum(x * weights[..., tf.newaxis], axis=1)
    logits = keras.layers.Dense(3)(pooled)
    model = keras.Model({"ids": ids, "mask": mask}, logits)
    rng = np.random.default_rng(1)
    data = {"ids": rng.integers(1, 50, (6, 8)).astype(np.int32),
            "mask": np.ones((6, 8), np.int32)}
    data["mask"][:, 5:] = 0
    result = to_tflite(model, tmp_path / "f16.tflite", mode="float16", verify_data=data)
    assert np.isfinite(result.verification.max_abs_diff)
    assert result.verification.max_abs_diff <= 1e-2


def test_mixed_precision_rebuilt(tiny_config, tmp_path):
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = classifier(build_encoder(tiny_config), num_classes=3)
    keras.mixed_precision.set_global_policy("float32")
    data = random_inputs(batch=4, seq=12)
    result = to_tflite(model, tmp_path / "mixed.tflite", verify_data=data)
    # Verified against the float32 rebuild; the float16 original is close to it.
    assert result.verification.max_abs_diff <= 1e-4
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(tmp_path / "mixed.tflite")).get_signature_runner()
    example = {k: v[:1] for k, v in data.items()}
    mixed = np.asarray(model(example, training=False), np.float32)
    assert np.max(np.abs(runner(**example)["classifier_logits"] - mixed)) <= 1e-2


def test_exact_gelu_and_mha_builtin(tmp_path):
    inputs = keras.Input((8, 16))
    attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)(inputs, inputs)
    hidden = keras.layers.Dense(32)(attention)
    hidden = keras.layers.Lambda(lambda t: tf.nn.gelu(t, approximate=False))(hidden)
    model = keras.Model(inputs, keras.layers.Dense(4)(hidden))
    data = np.random.default_rng(2).normal(size=(3, 8, 16)).astype(np.float32)
    result = to_tflite(model, tmp_path / "mha.tflite", verify_data=data)
    assert "GELU" in result.operators
    assert "BATCH_MATMUL" in result.operators or "FULLY_CONNECTED" in result.operators
    assert not any(op.startswith("custom:") for op in result.operators)
    assert result.verification.max_abs_diff <= 1e-4


def test_rejects_float_ids(tiny_classifier, data, tmp_path):
    floats = dict(data, input_word_ids=data["input_word_ids"].astype(np.float32))
    with pytest.raises(TypeError, match="input_word_ids.*float32.*astype"):
        to_tflite(tiny_classifier, tmp_path / "m.tflite", mode="int8",
                  representative_data=floats)
    assert not (tmp_path / "m.tflite").exists()


def test_rejects_unknown_mode(tiny_classifier, tmp_path):
    with pytest.raises(ValueError) as error:
        to_tflite(tiny_classifier, tmp_path / "m.tflite", mode="int2")
    assert "'int2'" in str(error.value)
    for mode in MODES:
        assert mode in str(error.value)


def test_rejects_existing_path(tiny_classifier, data, tmp_path):
    path = tmp_path / "m.tflite"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        to_tflite(tiny_classifier, path, verify_data=data)
    assert path.read_bytes() == b"keep me"


def test_failed_export_removes_new_folders(tiny_classifier, data, tmp_path):
    path = tmp_path / "new" / "deeper" / "m.tflite"
    with pytest.raises(VerificationError):
        to_tflite(tiny_classifier, path, mode="dynamic", verify_data=data,
                  tolerance=Tolerance(max_abs_diff=0.0))
    assert os.listdir(tmp_path) == []


def test_int8_needs_calibration(tiny_classifier, data, tmp_path):
    with pytest.raises(ValueError, match="representative_data"):
        to_tflite(tiny_classifier, tmp_path / "m.tflite", mode="int8", verify_data=data)


def test_int16x8_runs_layer_norm_in_int16(tiny_classifier, data, tmp_path):
    # The converter's own 16x8 mode makes int16 SQUARED_DIFFERENCE / RSQRT that
    # LiteRT 2.3.0 cannot run. The ai-edge-quantizer path runs them in int16.
    # Direction only: on these 8 random examples one near-tied argmax flips (7 of 8
    # agree). The label agreement of int16x8 is checked on the trained MiniLM by the job.
    result = to_tflite(tiny_classifier, tmp_path / "m.tflite", mode="int16x8",
                       representative_data=data, tolerance=Tolerance(min_cosine=0.99))
    with open(result.path, "rb") as f:
        content = f.read()
    # Five LayerNormalizations: embeddings, then attention and FFN of two blocks.
    assert flatbuffer.operators_with_input_type(content, "RSQRT", "INT16") == 5
    # Six projections a block and the pooler in int16; the logits layer, which
    # produces the output, stays float32 so that the output comes out as float.
    assert flatbuffer.operators_with_input_type(content, "FULLY_CONNECTED", "INT16") == 13
    assert flatbuffer.operators_with_input_type(content, "FULLY_CONNECTED", "FLOAT32") == 1
    outputs = Interpreter(model_content=content).get_output_details()
    assert [detail["dtype"] for detail in outputs] == [np.float32]
    assert result.verification.cosine >= 0.99


def test_int16x8_rejects_float_inputs(tmp_path):
    inputs = keras.Input((4, 8))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    data = np.zeros((2, 4, 8), np.float32)
    with pytest.raises(ValueError, match="int16x8.*float"):
        to_tflite(model, tmp_path / "m.tflite", mode="int16x8", representative_data=data)
    assert os.listdir(tmp_path) == []


def test_int4_quantizes_embedding_tables(tiny_classifier, data, tmp_path):
    result = to_tflite(tiny_classifier, tmp_path / "int4.tflite", mode="int4",
                       verify_data=data, tolerance=Tolerance(min_cosine=0.95))
    operators = _operator_inputs(result.path)
    # No GATHER is left on a float32 table of 32 rows or more.
    float_gathers = [inputs[0] for name, inputs in operators if name == "GATHER"
                     and inputs[0][1] == schema.TensorType.FLOAT32 and inputs[0][0][0] >= 32]
    assert float_gathers == []
    tables = [inputs[1] for name, inputs in operators if name == "EMBEDDING_LOOKUP"]
    # Word (100 x 32) and token-type (2 x 32) tables: rows of 32 are one int4 block.
    assert sorted(tables) == [((2, 32), schema.TensorType.INT4),
                              ((100, 32), schema.TensorType.INT4)]


def test_gather_rewrite_keeps_outputs(tiny_classifier, data, tmp_path):
    result = to_tflite(tiny_classifier, tmp_path / "f.tflite", verify_data=data)
    with open(result.path, "rb") as f:
        content = f.read()
    rewritten = flatbuffer.gather_to_embedding_lookup(content)
    assert "EMBEDDING_LOOKUP" in flatbuffer.operator_names(rewritten)
    examples = [{k: v[i:i + 1] for k, v in data.items()} for i in range(4)]
    before = run_tflite(content, examples)
    after = run_tflite(rewritten, examples)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)


def test_int8_float_tensors_explicit(tiny_classifier, data, tmp_path):
    result = to_tflite(tiny_classifier, tmp_path / "m.tflite", mode="int8",
                       representative_data=data, float_tensors=[r"/residual/"],
                       tolerance=Tolerance(min_cosine=0.9))
    # Two blocks, each with an attention and an FFN residual add.
    assert result.float_nodes == 4
    assert result.float_tensors == (r"/residual/",)


def test_int8_float_matmuls_get_int8_weights(tiny_classifier, data, tmp_path):
    result = to_tflite(tiny_classifier, tmp_path / "m.tflite", mode="int8",
                       representative_data=data, float_tensors=[r"/ffn/output/"],
                       tolerance=Tolerance(min_cosine=0.9))
    float_matmuls = [inputs[1][1] for name, inputs in _operator_inputs(result.path)
                     if name == "FULLY_CONNECTED"
                     and inputs[0][1] == schema.TensorType.FLOAT32]
    # One FFN output projection a block: float32 activations, int8 weights.
    assert float_matmuls == [schema.TensorType.INT8, schema.TensorType.INT8]


def test_int8_qat_without_calibration_rejected(tiny_classifier, data, tmp_path):
    from tfcompress.compress import Recipe, compress

    recipe = Recipe([{"match": r".*attention/(query|key|value)",
                      "quantize": {"mode": "qat", "bits": 8}}])
    qat, _ = compress(tiny_classifier, recipe, calibration_data=data)
    # Only the query / key / value inputs have fake-quant ranges, so the other matmuls
    # would silently stay float32.
    with pytest.raises(ValueError, match="representative_data"):
        to_tflite(qat, tmp_path / "m.tflite", mode="int8", verify_data=data)
    assert os.listdir(tmp_path) == []


def test_int4_keeps_unblocked_weights_float(tmp_path):
    keras.utils.set_random_seed(0)
    ids = keras.Input((8,), dtype="int32", name="ids")
    hidden = keras.layers.Dense(40)(keras.layers.Embedding(50, 64)(ids))
    model = keras.Model(ids, keras.layers.Dense(3)(hidden))
    data = {"ids": np.random.default_rng(0).integers(0, 50, (4, 8)).astype(np.int32)}
    result = to_tflite(model, tmp_path / "m.tflite", mode="int4", verify_data=data,
                       tolerance=Tolerance(min_cosine=0.95))
    weights = dict(inputs[1] for name, inputs in _operator_inputs(result.path)
                   if name in ("FULLY_CONNECTED", "EMBEDDING_LOOKUP"))
    # Blocks of 32 run along the last axis: 64 splits into two, 40 does not.
    assert weights == {(50, 64): schema.TensorType.INT4,
                       (40, 64): schema.TensorType.INT4,
                       (3, 40): schema.TensorType.FLOAT32}


def test_int8_auto_tries_every_stage(tiny_classifier, data, tmp_path, caplog):
    caplog.set_level("INFO", logger="tfcompress.export.tflite")
    path = tmp_path / "m.tflite"
    with pytest.raises(VerificationError):
        to_tflite(tiny_classifier, path, mode="int8", representative_data=data,
                  tolerance=Tolerance(max_abs_diff=0.0))
    escalations = [r for r in caplog.records if "Keeping more in float32" in r.getMessage()]
    # Stages 1 and 2 failed and moved on, and stage 3 was the last one tried.
    assert len(escalations) == len(INT8_FLOAT_STAGES) - 1
    assert not path.exists()


@pytest.mark.parametrize("value, error", [("residual", TypeError), (["("], ValueError),
                                          ([b"residual"], TypeError)])
def test_float_tensors_invalid(tiny_classifier, data, tmp_path, value, error):
    with pytest.raises(error, match="float_tensors"):
        to_tflite(tiny_classifier, tmp_path / "m.tflite", mode="int8",
                  representative_data=data, float_tensors=value)
    assert os.listdir(tmp_path) == []


def test_flex_op_named(tmp_path):
    inputs = keras.Input((4, 4))
    singular = keras.layers.Lambda(lambda t: tf.linalg.svd(t, compute_uv=False))(inputs)
    model = keras.Model(inputs, singular)
    data = np.eye(4, dtype=np.float32)[np.newaxis]
    with pytest.raises(UnsupportedOpError, match="Svd") as error:
        to_tflite(model, tmp_path / "svd.tflite", verify_data=data)
    assert error.value.ops == ["Svd"]
    assert os.listdir(tmp_path) == []

    # The same graph converted with custom ops allowed carries a custom op, which the
    # flatbuffer check names.
    function = tf.function(lambda t: model(t, training=False))
    concrete = function.get_concrete_function(tf.TensorSpec([1, 4, 4], tf.float32))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete])
    converter.allow_custom_ops = True
    with pytest.raises(UnsupportedOpError, match="Svd"):
        check_builtin_ops(converter.convert())


def test_weight_stats_hand_counted(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="dense")(inputs))
    kernel = np.arange(12, dtype=np.float32).reshape(4, 3)
    kernel[1] = 0.0  # 3 zeros here plus the 0 at [0, 0]: 4 of 12.
    model.get_layer("dense").set_weights([kernel, np.zeros(3, np.float32)])
    result = to_tflite(model, tmp_path / "m.tflite", verify_data=np.ones((1, 4), np.float32))
    stats = weight_stats((tmp_path / "m.tflite").read_bytes())
    assert stats.elements == 12
    assert stats.zeros == 4
    assert result.sparsity == pytest.approx(4 / 12)
