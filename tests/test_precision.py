"""Tests of precision policies: rebuild, float32 islands, loss scaling, masking, saving."""

import numpy as np
import pytest

from conftest import random_inputs
from tfcompress._keras import keras, tf
from tfcompress.bert import build_encoder, classifier
from tfcompress.train import fine_tune, policy_scope, rebuild


def _dataset(n=8):
    x = random_inputs(batch=n, seq=16, seed=1)
    y = (x["input_word_ids"][:, 0] % 3).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(4)


def test_policy_restored_after_failure(tiny_encoder):
    def broken():
        yield random_inputs(batch=4, seq=16), np.zeros(4, np.int32)
        raise RuntimeError("broken input pipeline")

    spec = (tf.nest.map_structure(lambda v: tf.TensorSpec((None, None), tf.int32),
                                  random_inputs()), tf.TensorSpec((None,), tf.int32))
    data = tf.data.Dataset.from_generator(broken, output_signature=spec)
    with pytest.raises(Exception, match="broken input pipeline"):
        fine_tune(classifier(tiny_encoder, 3), data, steps_per_epoch=3,
                  precision="mixed_bfloat16", verbose=0)
    assert keras.mixed_precision.global_policy().name == "float32"


def test_policy_scope_rejects_pure_float16():
    with pytest.raises(ValueError, match="mixed_bfloat16"):
        with policy_scope("bfloat16"):
            pass


def test_bfloat16_rebuild_keeps_float32_islands(tiny_encoder):
    model = classifier(tiny_encoder, 3, dropout=0.0)
    fine_tune(model, _dataset(), precision="mixed_bfloat16", verbose=0)
    # The caller's model keeps its float32 layers; weights were copied back into it.
    assert {layer.compute_dtype for layer in model.layers if layer.weights} == {"float32"}

    trained = rebuild(model, "mixed_bfloat16")
    layers = {layer.name: layer for layer in trained.layers}
    assert layers["transformer/layer_0/attention/query"].compute_dtype == "bfloat16"
    assert layers["transformer/layer_1/ffn/intermediate"].compute_dtype == "bfloat16"
    assert layers["transformer/layer_0/attention/layer_norm"].compute_dtype == "float32"
    assert layers["embeddings/layer_norm"].compute_dtype == "float32"
    assert layers["classifier/logits"].compute_dtype == "float32"
    assert {v.dtype for v in trained.weights} == {tf.float32}
    for a, b in zip(model.get_weights(), trained.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_loss_scale_skips_inf_step():
    with policy_scope("mixed_float16"):
        inputs = keras.Input((2,))
        model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
        optimizer = keras.mixed_precision.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    before = [v.numpy().copy() for v in model.trainable_variables]
    scale = float(optimizer.loss_scale)
    grads = [tf.fill(v.shape, np.inf) for v in model.trainable_variables]
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    assert float(optimizer.loss_scale) == scale / 2
    for old, var in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(var.numpy(), old)


def _tiny_encoder_factory(config):
    return build_encoder(config)


def _low_rank_attention_factory(config):
    from tfcompress.compress import Recipe, compress

    recipe = Recipe.from_dict({"compress": [
        {"match": r"transformer/layer_\d+/attention/(query|key|value|output)",
         "low_rank": {"rank": 4}}]})
    model, _ = compress(build_encoder(config), recipe)
    return model


@pytest.mark.parametrize("factory", [_tiny_encoder_factory, _low_rank_attention_factory])
def test_fp16_half_masked_attention(tiny_config, factory):
    reference = factory(tiny_config)
    with policy_scope("mixed_float16"):
        half = rebuild(reference, "mixed_float16")
    inputs = random_inputs(batch=2, seq=16, pad_from=8)

    with tf.GradientTape() as tape:
        out = half(inputs, training=True)["sequence_output"]
        loss = tf.reduce_sum(tf.cast(out, tf.float32))
    grads = tape.gradient(loss, half.trainable_variables)
    assert np.isfinite(out.numpy()).all()
    assert all(np.isfinite(tf.convert_to_tensor(g).numpy()).all() for g in grads
               if g is not None)

    layers = {layer.name: layer for layer in half.layers}
    probe = keras.Model(half.input, [layers[f"transformer/layer_0/attention/{n}"].output
                                     for n in ("query", "key")])
    query, key = probe(inputs)
    probs = layers["transformer/layer_0/attention/core"].attention_probs(
        query, key, inputs["input_mask"]).numpy()
    assert probs.dtype == np.float32
    assert probs[..., 8:].max() < 1e-3

    # float16 keeps about 3 decimal digits; LayerNorm outputs are O(1).
    expected = reference(inputs)["sequence_output"].numpy()
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-2)


@pytest.mark.slow
def test_fp16_trained_savedmodel_float32_variables(tiny_encoder, tmp_path):
    model = classifier(tiny_encoder, 3, dropout=0.0)
    fine_tune(model, _dataset(), precision="mixed_float16", verbose=0)
    with policy_scope("mixed_float16"):
        trained = rebuild(model, "mixed_float16")
    path = str(tmp_path / "saved")
    trained.save(path, save_format="tf")
    loaded = tf.saved_model.load(path)
    assert len(loaded.variables) == len(trained.weights)
    assert {v.dtype for v in loaded.variables} == {tf.float32}
