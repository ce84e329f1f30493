import numpy as np
import pytest

from conftest import random_inputs
from tfcompress._keras import keras, tf
from tfcompress.bert import BertConfig, build_encoder, classifier, encoder_config


def test_encoder_interface(tiny_encoder):
    assert sorted(tiny_encoder.input) == ["input_mask", "input_type_ids", "input_word_ids"]
    assert all(i.dtype == tf.int32 for i in tiny_encoder.inputs)
    out = tiny_encoder(random_inputs(batch=3, seq=10))
    assert out["sequence_output"].shape == (3, 10, 32)
    assert out["pooled_output"].shape == (3, 32)
    assert len(out["encoder_outputs"]) == 2
    np.testing.assert_array_equal(out["encoder_outputs"][-1], out["sequence_output"])


def test_encoder_projection_names(tiny_encoder):
    names = {layer.name for layer in tiny_encoder.layers}
    for i in range(2):
        for part in ("attention/query", "attention/key", "attention/value", "attention/output",
                     "ffn/intermediate", "ffn/output", "attention/layer_norm", "ffn/layer_norm"):
            assert f"transformer/layer_{i}/{part}" in names
    assert "pooler" in names
    assert "embeddings/word_embeddings" in names


def test_encoder_parameter_count(tiny_config):
    encoder = build_encoder(tiny_config)
    h, v, p, t, f = 32, 100, 64, 2, 64
    embeddings = v * h + p * h + t * h + 2 * h
    block = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 2 * 2 * h
    pooler = h * h + h
    assert encoder.count_params() == embeddings + 2 * block + pooler


def test_padding_does_not_change_outputs(tiny_encoder):
    inputs = random_inputs(batch=2, seq=12, pad_from=8)
    full = tiny_encoder(inputs)["sequence_output"].numpy()
    short = {k: v[:, :8] for k, v in inputs.items()}
    trimmed = tiny_encoder(short)["sequence_output"].numpy()
    # Padded keys get exp(-10000) = 0 weight, so the first 8 positions agree to float noise.
    np.testing.assert_allclose(full[:, :8], trimmed, atol=1e-5)


def test_mask_is_finite_in_mixed_float16(tiny_config):
    keras.mixed_precision.set_global_policy("mixed_float16")
    encoder = build_encoder(tiny_config)
    out = encoder(random_inputs(batch=2, seq=12, pad_from=6))
    assert np.isfinite(out["sequence_output"].numpy()).all()
    assert out["sequence_output"].dtype == tf.float32
    core = encoder.get_layer("transformer/layer_0/attention/core")
    query = tf.random.normal([2, 12, 32], dtype=tf.float16)
    mask = tf.constant(random_inputs(batch=2, seq=12, pad_from=6)["input_mask"])
    probs = core.attention_probs(query, query, mask).numpy()
    assert probs.dtype == np.float32
    assert np.isfinite(probs).all()
    assert probs[..., 6:].max() < 1e-3


def test_encoder_config_round_trip(tiny_config, tiny_encoder):
    assert encoder_config(tiny_encoder) == tiny_config


def test_config_rejects_bad_heads():
    with pytest.raises(ValueError, match="num_heads=5"):
        BertConfig(hidden_size=32, num_heads=5)


def test_saved_model_reload(tiny_encoder, tmp_path):
    inputs = random_inputs()
    expected = tiny_encoder(inputs)["pooled_output"].numpy()
    for path in (tmp_path / "encoder.keras", tmp_path / "saved_model"):
        tiny_encoder.save(path)
        reloaded = keras.models.load_model(path)
        np.testing.assert_array_equal(reloaded(inputs)["pooled_output"].numpy(), expected)


def test_classifier_flat_float32_logits(tiny_encoder):
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = classifier(tiny_encoder, num_classes=3, pooling="mean")
    logits = model(random_inputs(batch=4))
    assert logits.shape == (4, 3)
    assert logits.dtype == tf.float32
    names = {layer.name for layer in model.layers}
    assert "transformer/layer_1/ffn/output" in names


def test_classifier_rejects_one_class(tiny_encoder):
    with pytest.raises(ValueError, match="received 1"):
        classifier(tiny_encoder, num_classes=1)
