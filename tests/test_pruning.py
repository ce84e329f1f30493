"""Tests of tfcompress.layers.pruning: exact mask counts, N:M, Wanda, schedules, strip."""

import math
import os

import numpy as np
import pytest
import tensorflow_model_optimization as tfmot

from tfcompress._keras import keras, tf
from tfcompress.layers import (
    CompressedDense,
    CompressedEinsumDense,
    PruningMask,
    PruningStep,
    has_scheduled_pruning,
    low_rank,
    prune,
    strip_layer,
)
from tfcompress.layers.pruning import magnitude_mask, n_m_mask


def _dense(kernel, name="proj"):
    layer = keras.layers.Dense(kernel.shape[1], name=name)
    layer.build((None, kernel.shape[0]))
    layer.set_weights([np.asarray(kernel, "float32"), np.zeros(kernel.shape[1], "float32")])
    return layer


def _mask(layer, name="kernel"):
    return layer.transforms[name][-1].mask.numpy()


def test_magnitude_exact_count_512():
    source = _dense(np.random.default_rng(0).normal(size=(512, 512)))
    pruned = prune(source, sparsity=0.5)
    assert isinstance(pruned, CompressedDense)
    assert pruned.name == "proj"
    mask = _mask(pruned)
    assert int(np.sum(mask == 0)) == 131072
    kept = np.abs(source.kernel.numpy())[mask == 1]
    dropped = np.abs(source.kernel.numpy())[mask == 0]
    assert kept.min() >= dropped.max()
    # The source keeps its dense kernel.
    assert int(np.sum(source.kernel.numpy() == 0)) == 0


def test_magnitude_ties_prune_lower_index_first():
    np.testing.assert_array_equal(
        magnitude_mask(np.ones((3, 4)), 0.25),
        [[0, 0, 0, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
    # floor(0.5 * 5 + 0.5) = 3 of 5 equal scores.
    np.testing.assert_array_equal(magnitude_mask(np.ones(5), 0.5), [0, 0, 0, 1, 1])


def test_two_four_every_group_keeps_two_largest():
    kernel = np.random.default_rng(1).normal(size=(16, 8))
    mask = _mask(prune(_dense(kernel), pattern="2:4"))
    groups = mask.reshape(4, 4, 8)
    np.testing.assert_array_equal(groups.sum(axis=1), np.full((4, 8), 2.0))
    magnitude = np.abs(kernel).reshape(4, 4, 8)
    assert np.all(np.where(groups == 1, magnitude, np.inf).min(axis=1)
                  >= np.where(groups == 0, magnitude, -np.inf).max(axis=1))
    np.testing.assert_array_equal(n_m_mask(np.ones((4, 1)), 2, 4), [[1], [1], [0], [0]])


def test_two_four_einsum_groups_along_contraction():
    source = keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 2, 3),
                                      bias_axes="de")
    source(tf.zeros([1, 2, 8]))
    pruned = prune(source, pattern="2:4")
    assert isinstance(pruned, CompressedEinsumDense)
    mask = _mask(pruned)
    assert mask.shape == (8, 2, 3)
    np.testing.assert_array_equal(mask.reshape(2, 4, 6).sum(axis=1), np.full((2, 6), 2.0))


def test_two_four_needs_divisible_inputs():
    with pytest.raises(ValueError, match="multiple of 4; received 6 input rows"):
        prune(_dense(np.ones((6, 4))), pattern="2:4")


def test_wanda_hand_computed_case():
    kernel = np.array([[1.0, -4.0], [2.0, 3.0], [-3.0, 2.0], [4.0, 1.0]])
    calibration = np.array([[1.0, 2.0, 0.0, 0.5], [1.0, -2.0, 0.5, 0.0]], "float32")
    # Input norms ||X_i||: sqrt(2), sqrt(8), 0.5, 0.5. Scores |W_ij| * ||X_i||:
    # column 0: 1.41, 5.66, 1.5, 2.0 -> prune rows 0, 2
    # column 1: 5.66, 8.49, 1.0, 0.5 -> prune rows 2, 3
    pruned = prune(_dense(kernel), sparsity=0.5, method="wanda",
                   calibration_inputs=calibration)
    np.testing.assert_array_equal(_mask(pruned), [[0, 1], [1, 1], [0, 0], [1, 0]])
    magnitude = prune(_dense(kernel), sparsity=0.5)
    assert not np.array_equal(_mask(magnitude), _mask(pruned))


def test_wanda_low_rank_second_factor():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 12)).astype("float32") * np.linspace(0.1, 3.0, 12)
    factored = low_rank(_dense(rng.normal(size=(12, 8))), rank=3)
    pruned = prune(factored, sparsity=0.5, method="activation", calibration_inputs=x)
    # The inputs of the second factor pass through the already pruned first factor.
    hidden = x.astype(np.float64) @ (factored.kernel_a.numpy() * _mask(pruned, "kernel_a"))
    norms = np.linalg.norm(hidden, axis=0)
    scores = np.abs(factored.kernel_b.numpy()) * norms[:, None]
    # floor(0.5 * 3 + 0.5) = 2 of 3 rows pruned per column.
    expected = np.ones((3, 8))
    np.put_along_axis(expected, np.argsort(scores, axis=0, kind="stable")[:2], 0.0, axis=0)
    np.testing.assert_array_equal(_mask(pruned, "kernel_b"), expected)


def test_argument_checks():
    source = _dense(np.ones((8, 4)))
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\); received "
                                         r"sparsity=1.0"):
        prune(source, sparsity=1.0)
    with pytest.raises(ValueError, match="exactly one of sparsity and pattern"):
        prune(source, sparsity=0.5, pattern="2:4")
    with pytest.raises(ValueError, match="0 < N < M; received '4:2'"):
        prune(source, pattern="4:2")
    with pytest.raises(NotImplementedError, match="one-shot"):
        prune(source, sparsity=0.5, method="wanda", schedule="constant",
              calibration_inputs=np.ones((2, 8)))
    with pytest.raises(ValueError, match="schedule must be None, 'constant'"):
        prune(source, sparsity=0.5, schedule="cubic")


class _MaskRecorder(keras.callbacks.Callback):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.zeros = []

    def on_train_batch_begin(self, batch, logs=None):
        self.zeros.append(int(np.sum(_mask(self.layer) == 0)))


def _fit_scheduled(pruned, steps):
    inputs = keras.Input((pruned.kernel.shape[0],))
    hidden = pruned(inputs)
    outputs = keras.layers.Dense(2, dtype="float32")(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    recorder = _MaskRecorder(pruned)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(steps, pruned.kernel.shape[0])).astype("float32")
    y = rng.normal(size=(steps, 2)).astype("float32")
    model.fit(x, y, batch_size=1, epochs=1, verbose=0, callbacks=[PruningStep(), recorder])
    return model, recorder


def test_polynomial_schedule_matches_tfmot_formula():
    source = _dense(np.random.default_rng(4).normal(size=(16, 8)))
    pruned = prune(source, sparsity=0.75, schedule="polynomial", begin_step=0, end_step=6,
                   frequency=2, initial_sparsity=0.0)
    model, recorder = _fit_scheduled(pruned, steps=8)
    assert has_scheduled_pruning(model)

    schedule = pruned.transforms["kernel"][-1].schedule
    expected = []
    zeros = 0
    for step in range(8):
        should_prune, sparsity = schedule(tf.constant(step, tf.int64))
        formula = 0.75 + (0.0 - 0.75) * (1 - min(step, 6) / 6) ** 3
        assert float(sparsity) == pytest.approx(formula, abs=1e-6)
        if bool(should_prune):
            zeros = math.floor(formula * 128 + 0.5)
        expected.append(zeros)
    # Steps 0, 2, 4, 6 prune to 0, 68, 92 and 96 of the 128 weights.
    assert expected == [0, 0, 68, 68, 92, 92, 96, 96]
    assert recorder.zeros == expected
    assert int(pruned.transforms["kernel"][-1].variables["pruning_step"].numpy()) == 7
    # Pruned weights get zero gradient, so the masked kernel keeps exactly 96 zeros.
    assert int(np.sum(pruned.effective_kernel("kernel").numpy() == 0)) == 96


def test_mixed_float16_scheduled_pruning_reaches_target():
    keras.mixed_precision.set_global_policy("mixed_float16")
    source = keras.layers.Dense(8, name="proj")
    source.build((None, 16))
    pruned = prune(source, sparsity=0.5, schedule="constant", begin_step=0, end_step=4,
                   frequency=2)
    model, recorder = _fit_scheduled(pruned, steps=6)
    transform = pruned.transforms["kernel"][-1]
    assert pruned.kernel.dtype == tf.float32
    assert transform.mask.dtype == tf.float32
    assert model.predict(np.ones((1, 16), "float32"), verbose=0).dtype == np.float32
    assert pruned(tf.ones([1, 16])).dtype == tf.float16
    assert recorder.zeros == [64] * 6
    assert int(np.sum(pruned.effective_kernel("kernel").numpy() == 0)) == 64


def test_has_scheduled_pruning_false_for_one_shot():
    pruned = prune(_dense(np.ones((4, 4))), sparsity=0.5)
    model = keras.Sequential([keras.Input((4,)), pruned])
    assert not has_scheduled_pruning(model)


def test_scheduled_mask_config_and_reload(tmp_path):
    source = _dense(np.random.default_rng(5).normal(size=(8, 4)))
    pruned = prune(source, sparsity=0.5, schedule="polynomial", end_step=10, frequency=5)
    config = pruned.transforms["kernel"][-1].get_config()
    assert config["schedule"] == {
        "class_name": "PolynomialDecay",
        "config": {"initial_sparsity": 0.0, "final_sparsity": 0.5, "power": 3,
                   "begin_step": 0, "end_step": 10, "frequency": 5}}
    assert PruningMask.from_config(config).get_config() == config
    model, _ = _fit_scheduled(pruned, steps=6)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    reloaded = loaded.get_layer("proj").transforms["kernel"][-1]
    assert int(reloaded.variables["pruning_step"].numpy()) == 5
    np.testing.assert_array_equal(reloaded.mask.numpy(), _mask(pruned))
    x = np.ones((2, 8), "float32")
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_strip_removes_pruning_state():
    source = _dense(np.random.default_rng(6).normal(size=(8, 4)))
    pruned = prune(source, sparsity=0.5, schedule="constant", end_step=10, frequency=1)
    _fit_scheduled(pruned, steps=2)
    stripped = strip_layer(pruned)
    assert type(stripped) is keras.layers.Dense
    names = [v.name for v in stripped.weights]
    for word in ("mask", "threshold", "pruning_step"):
        assert not any(word in name for name in names)
    np.testing.assert_array_equal(stripped.kernel.numpy(),
                                  pruned.kernel.numpy() * _mask(pruned))
    assert int(np.sum(stripped.kernel.numpy() == 0)) == 16
    x = np.random.default_rng(7).normal(size=(3, 8)).astype("float32")
    np.testing.assert_allclose(stripped(x).numpy(), pruned(x).numpy(), atol=1e-6)


def test_prune_again_keeps_earlier_zeros():
    source = _dense(np.random.default_rng(8).normal(size=(8, 8)))
    first = prune(source, sparsity=0.25)
    second = prune(first, sparsity=0.5)
    assert len(second.transforms["kernel"]) == 1
    assert np.all(_mask(second)[_mask(first) == 0] == 0)
    assert int(np.sum(_mask(second) == 0)) == 32
