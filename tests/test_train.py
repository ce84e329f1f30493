"""Tests of tfcompress.train.fine_tune, the schedule, recomputation and the NaN guard."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import random_inputs
from tfcompress._keras import keras, tf
from tfcompress.bert import build_encoder, classifier
from tfcompress.train import (WarmupLinearDecay, extract_blocks, fine_tune, recompute_model)


def _dataset(n=16, batch=8, seq=16, seed=0):
    x = random_inputs(batch=n, seq=seq, seed=seed, pad_from=12)
    y = (x["input_word_ids"][:, 0] % 3).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def test_schedule_warmup_then_decay():
    schedule = WarmupLinearDecay(1e-3, total_steps=10, warmup_steps=2)
    rates = [float(schedule(step)) for step in (0, 1, 2, 6, 10, 12)]
    # Hand-computed: 1e-3 * 1/2 at step 1, peak at 2, (10 - 6) / 8 of peak at 6.
    np.testing.assert_allclose(rates, [0.0, 5e-4, 1e-3, 5e-4, 0.0, 0.0], atol=1e-9)
    assert WarmupLinearDecay.from_config(schedule.get_config()).get_config() == \
        schedule.get_config()


def test_schedule_rejects_bad_warmup():
    with pytest.raises(ValueError, match="warmup_steps must be an integer in"):
        WarmupLinearDecay(1e-3, total_steps=10, warmup_steps=11)


def test_recompute_gradients_match(tiny_encoder):
    model = classifier(tiny_encoder, 3, dropout=0.0)
    wrapped = recompute_model(model)
    names = [layer.name for layer in wrapped.layers]
    assert "transformer/layer_0/recompute" in names
    assert "transformer/layer_1/recompute" in names
    assert not any(name.startswith("transformer/layer_0/attention") for name in names)
    inputs = random_inputs(pad_from=10)

    def gradients(m):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(m(inputs, training=True)))
        grads = tape.gradient(loss, m.trainable_variables)
        return {id(v): tf.convert_to_tensor(g).numpy() for v, g in zip(m.trainable_variables, grads)}

    plain, recomputed = gradients(model), gradients(wrapped)
    assert set(plain) == set(recomputed)
    assert len(plain) == len(model.trainable_variables)
    for key, value in plain.items():
        # Same ops in the same order; 1e-5 leaves room for kernel selection only.
        np.testing.assert_allclose(recomputed[key], value, atol=1e-5)


def test_recompute_model_reloads(tiny_encoder, tmp_path):
    wrapped = recompute_model(classifier(tiny_encoder, 3, dropout=0.0))
    inputs = random_inputs()
    expected = wrapped(inputs).numpy()
    path = str(tmp_path / "recompute.keras")
    wrapped.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_array_equal(reloaded(inputs).numpy(), expected)


def test_extract_blocks_shares_weights(tiny_encoder):
    blocks = extract_blocks(tiny_encoder)
    assert [b.index for b in blocks] == [0, 1]
    # 4 projections + 2 FFN Dense (kernel and bias each) and 2 LayerNorms (gamma, beta).
    assert len(blocks[0].model.trainable_weights) == 16
    encoder_ids = {id(v) for v in tiny_encoder.weights}
    assert all(id(v) in encoder_ids for v in blocks[1].model.weights)


def test_fine_tune_learns_and_returns_model(tiny_encoder):
    model = classifier(tiny_encoder, 3, dropout=0.0)
    before = [w.copy() for w in model.get_weights()]
    data = _dataset()
    history = fine_tune(model, data, data, epochs=3, learning_rate=3e-3, verbose=0)
    assert history.model is model
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(history.history["loss"]) == 3
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


@pytest.mark.parametrize("kwargs, message", [
    ({"precision": "float16"}, "Use precision='mixed_float16'"),
    ({"epochs": 0}, "epochs must be a positive integer"),
    ({"checkpoint_every": 5}, "needs checkpoint_dir"),
    ({"hidden_mse_weight": 1.0}, "needs a teacher"),
    ({"warmup_fraction": 1.5}, r"warmup_fraction must be in \[0, 1\]"),
])
def test_fine_tune_rejects_bad_args(tiny_encoder, kwargs, message):
    model = classifier(tiny_encoder, 3)
    with pytest.raises(ValueError, match=message):
        fine_tune(model, _dataset(), verbose=0, **kwargs)


def test_fine_tune_rejects_unknown_length(tiny_encoder):
    data = _dataset().filter(lambda x, y: True)
    with pytest.raises(ValueError, match="pass steps_per_epoch"):
        fine_tune(classifier(tiny_encoder, 3), data, verbose=0)


def test_nan_loss_names_step_keeps_checkpoint(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="logits")(inputs))
    x = np.ones((6, 4), np.float32)
    x[4] = np.nan  # the third batch of two
    data = tf.data.Dataset.from_tensor_slices((x, np.zeros(6, np.int32))).batch(2)
    with pytest.raises(FloatingPointError, match=r"at step 3 .*learning rate"):
        fine_tune(model, data, learning_rate=1e-2, checkpoint_dir=str(tmp_path),
                  checkpoint_every=1, verbose=0)

    latest = tf.train.latest_checkpoint(str(tmp_path / "chief"))
    assert latest is not None
    reader = tf.train.load_checkpoint(latest)
    assert reader.get_tensor("ckpt_saved_batch/.ATTRIBUTES/VARIABLE_VALUE") == 1
    kernels = [reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
               if "kernel" in k and "optimizer" not in k]
    assert kernels and all(np.isfinite(k).all() for k in kernels)


_MIRRORED_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from tfcompress._keras import keras, tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tfcompress.bert import BertConfig, build_encoder, classifier
    from tfcompress.train import fine_tune

    config = BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64, max_position_embeddings=64,
                        dropout_rate=0.0, attention_dropout_rate=0.0)
    rng = np.random.default_rng(0)
    x = {"input_word_ids": rng.integers(1, 100, (32, 16)).astype(np.int32),
         "input_mask": np.ones((32, 16), np.int32),
         "input_type_ids": np.zeros((32, 16), np.int32)}
    y = (x["input_word_ids"][:, 0] % 3).astype(np.int32)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    results = []
    for strategy in (None, tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])):
        keras.utils.set_random_seed(0)
        model = classifier(build_encoder(config), 3, dropout=0.0)
        fine_tune(model, data, epochs=2, learning_rate=1e-3, strategy=strategy, verbose=0)
        results.append(model.get_weights())
    diff = max(float(np.abs(a - b).max()) for a, b in zip(*results))
    print("MAXDIFF", diff)
""")


@pytest.mark.slow
def test_mirrored_matches_single_device(tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(_MIRRORED_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    diff = float(run.stdout.split("MAXDIFF")[1])
    # Two replicas sum half-batch gradients in another order than one device: float32
    # rounding over 8 steps stays far below 1e-4.
    assert diff < 1e-4
