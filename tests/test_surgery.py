"""Tests of tfcompress.compress.surgery: compress() on encoders, MHA, op layers, Sequential."""

import numpy as np
import pytest

from conftest import random_inputs
from tfcompress._keras import keras, tf
from tfcompress.bert import classifier
from tfcompress.compress import Recipe, RecipeError, compress
from tfcompress.compress.report import relative_error
from tfcompress.layers import PruningStep


def _rel(a, b):
    return relative_error(np.asarray(a), np.asarray(b))


def _zeros(layer, name="kernel"):
    return int(np.sum(layer.effective_kernel(name, training=False).numpy() == 0))


@pytest.fixture
def tiny_classifier(tiny_encoder):
    return classifier(tiny_encoder, num_classes=3)


def _scaled_attention_model():
    """Self-attention written with op layers: scores scaled by an inline multiply."""
    inputs = keras.Input((8, 16), name="tokens")
    q = keras.layers.Dense(16, name="query")(inputs)
    k = keras.layers.Dense(16, name="key")(inputs)
    v = keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 16), bias_axes="d",
                                 name="value")(inputs)
    scores = tf.matmul(q, k, transpose_b=True) * 0.25
    context = tf.matmul(tf.nn.softmax(scores, axis=-1), v)
    outputs = keras.layers.Dense(4, name="head")(inputs + context)
    return keras.Model(inputs, outputs)


def _mha_model():
    inputs = keras.Input((6, 16), name="tokens")
    x = keras.layers.Dense(16, name="proj")(inputs)
    attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")(x, x)
    x = keras.layers.LayerNormalization(name="norm")(x + attention * 0.5)
    outputs = keras.layers.Dense(3, name="head")(x[:, 0, :])
    return keras.Model(inputs, outputs)


def _op_layer_names(model):
    return [layer.name for layer in model.layers if "OpLambda" in type(layer).__name__]


def test_prune_keeps_op_layers_and_exact_sparsity():
    model = _scaled_attention_model()
    recipe = Recipe([{"match": "query|key|value|head", "prune": {"sparsity": 0.5}}])
    new, report = compress(model, recipe)

    assert _op_layer_names(new) == _op_layer_names(model)
    assert len(_op_layer_names(new)) == 5
    for name in ("query", "key", "value", "head"):
        layer = new.get_layer(name)
        size = int(np.prod(layer.kernel.shape))
        # Magnitude pruning zeroes round(0.5 * size) weights; a random init has no ties.
        assert abs(_zeros(layer) - size / 2) <= 1, name
        assert report[name].sparsity["kernel"] == _zeros(layer) / size
    assert type(new.get_layer("value")).__name__ == "CompressedEinsumDense"
    x = np.random.default_rng(0).normal(size=(2, 8, 16)).astype(np.float32)
    assert new(x).shape == (2, 8, 4)


def test_source_model_not_modified(tiny_classifier):
    before = [w.copy() for w in tiny_classifier.get_weights()]
    recipe = Recipe([{"match": r"transformer/layer_\d+/ffn/.*", "low_rank": {"rank": 4}},
                     {"type": "Dense", "match": ".*/attention/.*", "prune": {"sparsity": 0.5}}])
    new, _ = compress(tiny_classifier, recipe)
    new.get_layer("transformer/layer_0/attention/query").kernel.assign_add(
        tf.ones((32, 32)))
    after = tiny_classifier.get_weights()
    assert len(before) == len(after)
    for old, current in zip(before, after):
        np.testing.assert_array_equal(old, current)


def test_encoder_report_counts_from_weights(tiny_classifier):
    recipe = Recipe([
        {"match": r"transformer/layer_\d+/ffn/intermediate", "low_rank": {"rank": 4}},
        {"match": r"transformer/layer_0/attention/(query|key)", "prune": {"pattern": "2:4"}},
    ])
    inputs = random_inputs(batch=4)
    new, report = compress(tiny_classifier, recipe, calibration_data=inputs)

    assert [entry.name for entry in report.layers] == [
        "transformer/layer_0/attention/query", "transformer/layer_0/attention/key",
        "transformer/layer_0/ffn/intermediate", "transformer/layer_1/ffn/intermediate"]
    factored = new.get_layer("transformer/layer_0/ffn/intermediate")
    entry = report["transformer/layer_0/ffn/intermediate"]
    assert entry.rank == 4
    assert entry.params_before == 32 * 64 + 64
    assert entry.params_after == sum(int(np.prod(w.shape)) for w in factored.weights)
    assert entry.params_after == 4 * (32 + 64) + 64
    assert entry.bytes_after == 4 * entry.params_after

    pruned = new.get_layer("transformer/layer_0/attention/query")
    assert report["transformer/layer_0/attention/query"].sparsity == {"kernel": 0.5}
    assert _zeros(pruned) == 32 * 32 // 2

    # The error is the layer output error on the captured inputs of that layer.
    probe = keras.Model(tiny_classifier.inputs,
                        tiny_classifier.get_layer(entry.name).input)
    x = probe(inputs)
    expected = _rel(tiny_classifier.get_layer(entry.name)(x), factored(x))
    np.testing.assert_allclose(entry.error, expected, rtol=1e-5)

    assert report.params_before == tiny_classifier.count_params()
    assert report.params_after == sum(
        int(np.prod(w.shape)) for w in new.weights if "mask" not in w.name)
    totals = report.to_dict()
    assert totals["layers"][2]["rank"] == 4
    assert "| transformer/layer_0/ffn/intermediate | low_rank(rank=4" in report.to_markdown()


def test_structured_then_low_rank(tiny_classifier):
    recipe = Recipe([{"match": r"transformer/layer_1/attention/.*", "remove_heads": {"count": 2}},
                     {"remove_layers": {"indices": [0]}},
                     {"match": r"transformer/layer_0/ffn/output", "low_rank": {"rank": 4}}])
    new, report = compress(tiny_classifier, recipe)
    # Block 1 (two heads removed) is block 0 after remove_layers.
    assert new.get_layer("transformer/layer_0/attention/core").num_heads == 2
    assert [step["action"] for step in report.structured] == ["remove_heads", "remove_layers"]
    assert report.structured[0]["params_before"] - report.structured[0]["params_after"] == 2096
    assert type(new.get_layer("transformer/layer_0/ffn/output")).__name__ == "LowRankDense"


def test_mha_split_is_exact():
    model = _mha_model()
    recipe = Recipe([{"match": "mha", "prune": {"sparsity": 0.0}}])
    new, report = compress(model, recipe)
    names = [layer.name for layer in new.layers]
    for part in ("query", "key", "value", "core", "output"):
        assert f"mha/{part}" in names
    assert "mha" not in names
    assert [entry.name for entry in report.layers] == [
        "mha/query", "mha/key", "mha/value", "mha/output"]
    x = np.random.default_rng(1).normal(size=(3, 6, 16)).astype(np.float32)
    # Same math; the core scales scores after the matmul and MHA before it.
    np.testing.assert_allclose(new(x).numpy(), model(x).numpy(), atol=1e-5)


def test_mha_qat_and_layer_norm_note():
    model = _mha_model()
    x = np.random.default_rng(2).normal(size=(8, 6, 16)).astype(np.float32)
    recipe = Recipe([{"type": "MultiHeadAttention", "quantize": {"mode": "qat"}},
                     {"match": "proj|head|norm", "quantize": {"mode": "qat"}}])
    new, report = compress(model, recipe, calibration_data=x)
    assert type(new.get_layer("mha/core")).__name__ == "QuantizedAttentionCore"
    assert type(new.get_layer("norm")) is keras.layers.LayerNormalization
    assert report["norm"].notes == ["kept in float32 (LayerNormalization)"]
    # int8 weights and activations over a 16-wide model: a few percent of error.
    assert _rel(model(x), new(x)) < 0.05


def test_tiny_bert_qat_logits_close(tiny_classifier):
    inputs = random_inputs(batch=8, seed=3)
    recipe = Recipe([{"type": "Dense", "quantize": {"mode": "qat"}},
                     {"type": "AttentionCore", "quantize": {"mode": "qat"}},
                     {"type": "LayerNormalization", "quantize": {"mode": "qat"}}])
    new, report = compress(tiny_classifier, recipe, calibration_data=inputs)
    assert report["embeddings/layer_norm"].notes == ["kept in float32 (LayerNormalization)"]
    error = _rel(tiny_classifier(inputs), new(inputs, training=False))
    assert error < 0.05, error


def test_pruning_mixed_float16_reaches_target(tiny_config):
    from tfcompress.bert import build_encoder

    keras.mixed_precision.set_global_policy("mixed_float16")
    model = classifier(build_encoder(tiny_config), num_classes=2)
    recipe = Recipe([{"match": r"transformer/layer_\d+/ffn/.*",
                      "prune": {"sparsity": 0.5, "schedule": "polynomial", "begin_step": 0,
                                "end_step": 3, "frequency": 1}}])
    new, _ = compress(model, recipe)
    # Eager steps: four tiny batches run faster than tracing the train step.
    new.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    inputs = random_inputs(batch=8)
    labels = np.arange(8) % 2
    new.fit(inputs, labels, batch_size=2, epochs=1, callbacks=[PruningStep()], verbose=0)

    layer = new.get_layer("transformer/layer_1/ffn/output")
    assert layer.compute_dtype == "float16"
    variables = {v.name.split("/")[-1].split(":")[0]: v for v in layer.weights}
    assert variables["kernel"].dtype == tf.float32
    assert variables["kernel_mask"].dtype == tf.float32
    assert _zeros(layer) == 64 * 32 // 2


def test_sequential_model():
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(10, name="a"),
                              keras.layers.Dense(3, name="b")])
    new, report = compress(model, {"compress": [{"match": "a", "low_rank": {"rank": 2}}]})
    assert isinstance(new, keras.Sequential)
    assert type(new.get_layer("a")).__name__ == "LowRankDense"
    assert report["a"].params_after == 2 * (12 + 10) + 10
    assert new(np.ones((1, 12), np.float32)).shape == (1, 3)


@keras.utils.register_keras_serializable(package="tfcompress_tests")
class SelfAttentionBlock(keras.layers.Layer):
    """A user's subclassed layer holding a MultiHeadAttention and a Dense projection."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.attention = keras.layers.MultiHeadAttention(2, units // 2, name="inner_mha")
        self.projection = keras.layers.Dense(units, name="inner_dense")

    def call(self, inputs):
        return self.projection(inputs + self.attention(inputs, inputs))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def _custom_layer_model():
    inputs = keras.Input((5, 16))
    x = keras.layers.Dense(16, name="proj")(inputs)
    x = SelfAttentionBlock(16, name="block")(x)
    return keras.Model(inputs, keras.layers.Dense(8, name="head")(x[:, 0]))


@pytest.mark.parametrize("action", [
    {"low_rank": {"rank": 2}},
    {"prune": {"sparsity": 0.5}},
    {"quantize": {"mode": "qat"}},
    {"quantize": {"mode": "weight_only", "bits": 4}},
    {"prune": {"sparsity": 0.75}, "sparse": {}},
])
def test_custom_layer_reported_and_reloads(action, tmp_path):
    model = _custom_layer_model()
    x = np.random.default_rng(4).normal(size=(2, 5, 16)).astype(np.float32)
    recipe = Recipe([{"match": "proj|block/inner_dense", **action}])
    with pytest.warns(UserWarning, match="'block/inner_dense'.*subclassed layer 'block'"):
        new, report = compress(model, recipe, calibration_data=x)
    assert [item["name"] for item in report.unreachable] == ["block/inner_dense"]
    assert [entry.name for entry in report.layers] == ["proj"]

    path = str(tmp_path / "model.keras")
    new.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_array_equal(reloaded(x).numpy(), new(x).numpy())
    for saved, live in zip(reloaded.weights, new.weights):
        np.testing.assert_array_equal(saved.numpy(), live.numpy())


def test_saved_model_reload(tmp_path):
    model = _mha_model()
    x = np.random.default_rng(5).normal(size=(2, 6, 16)).astype(np.float32)
    new, _ = compress(model, {"compress": [
        {"match": "mha/(query|value)", "low_rank": {"rank": 2, "force": True}},
        {"match": "mha/output", "prune": {"sparsity": 0.5}}]})
    path = str(tmp_path / "saved")
    new.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(reloaded(x).numpy(), new(x).numpy(), atol=1e-6)


def test_errors_before_work(tiny_classifier):
    with pytest.raises(RecipeError, match="Closest layer names: 'transformer/layer_0/ffn/output'"):
        compress(tiny_classifier, {"compress": [{"match": "transformer/layer_0/ffn/outptu",
                                                 "low_rank": {"rank": 2}}]})
    with pytest.raises(RecipeError, match="method='activation' needs calibration data"):
        compress(tiny_classifier, {"compress": [{"match": ".*/ffn/output",
                                                 "prune": {"sparsity": 0.5,
                                                           "method": "activation"}}]})
    with pytest.raises(TypeError, match="recipe must be a tfcompress Recipe"):
        compress(tiny_classifier, "ffn")


def test_rejects_keras3_model():
    keras3 = pytest.importorskip("keras")
    if not keras3.__version__.startswith("3"):
        pytest.skip("Keras 3 is not installed")
    inputs = keras3.Input((4,))
    model = keras3.Model(inputs, keras3.layers.Dense(2)(inputs))
    with pytest.raises(TypeError, match="Keras 3 object.*tf_keras"):
        compress(model, {"compress": [{"match": ".*", "prune": {"sparsity": 0.5}}]})
