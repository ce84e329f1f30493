"""Tests of tfcompress.layers.base: structure layers, transforms, strip, sizes, reload."""

import os

import numpy as np
import pytest

from tfcompress._keras import keras, tf
from tfcompress.layers import (
    CompressedDense,
    CompressedEinsumDense,
    KernelTransform,
    LowRankDense,
    LowRankEinsumDense,
    PruningMask,
    deserialize_transform,
    register_transform,
    serialize_transform,
    strip_layer,
)
from tfcompress.layers.base import einsum_kernel_as_matrix, low_rank_equations


def _all_layers_model():
    inputs = keras.Input((6, 8))
    x = CompressedDense(12, activation="relu", name="dense",
                        kernel_transforms=[PruningMask(sparsity=0.5)])(inputs)
    x = LowRankDense(8, rank=3, name="low_rank")(x)
    heads = CompressedEinsumDense("abc,cde->abde", output_shape=(None, 2, 4),
                                  bias_axes="de", name="einsum")(x)
    merged = keras.layers.Reshape((6, 8))(heads)
    outputs = LowRankEinsumDense("abc,cd->abd", output_shape=(None, 5), rank=2,
                                 bias_axes="d", name="low_rank_einsum")(merged)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(3)
    model.set_weights([rng.normal(size=w.shape).astype(w.dtype.as_numpy_dtype)
                       if "mask" not in w.name else (rng.random(w.shape) > 0.5).astype("float32")
                       for w in model.weights])
    return model


def test_config_round_trip_every_layer():
    model = _all_layers_model()
    x = np.random.default_rng(0).normal(size=(2, 6, 8)).astype("float32")
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(clone(x).numpy(), model(x).numpy())
    for layer in model.layers[1:]:
        config = layer.get_config()
        assert type(layer).from_config(config).get_config() == config


@pytest.mark.parametrize("fmt", ["keras", "savedmodel"])
def test_reload_without_custom_objects(tmp_path, fmt):
    model = _all_layers_model()
    x = np.random.default_rng(1).normal(size=(2, 6, 8)).astype("float32")
    path = os.path.join(tmp_path, "model.keras" if fmt == "keras" else "saved")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    for original, reloaded in zip(model.weights, loaded.weights):
        # .keras reloads build layers outside their name scope, so compare the last part.
        assert original.name.split("/")[-1] == reloaded.name.split("/")[-1]
        np.testing.assert_array_equal(original.numpy(), reloaded.numpy())
    assert isinstance(loaded.get_layer("low_rank_einsum"), LowRankEinsumDense)


def test_compressed_dense_matches_keras_dense():
    x = np.random.default_rng(2).normal(size=(3, 5, 7)).astype("float32")
    dense = keras.layers.Dense(4, activation="gelu")
    dense(x)
    ours = CompressedDense(4, activation="gelu")
    ours(x)
    ours.set_weights(dense.get_weights())
    # Same kernel and op order; the tolerance covers tensordot's reshape path only.
    np.testing.assert_allclose(ours(x).numpy(), dense(x).numpy(), atol=1e-6)


def test_low_rank_einsum_equations_and_output():
    first, second = low_rank_equations("abcd,cde->abe")
    assert (first, second) == ("abcd,cdr->abr", "abr,re->abe")
    layer = LowRankEinsumDense("abcd,cde->abe", output_shape=(None, 6), rank=3,
                               bias_axes="e")
    x = np.random.default_rng(4).normal(size=(2, 5, 2, 4)).astype("float32")
    y = layer(x).numpy()
    assert layer.kernel_a.shape == (2, 4, 3)
    assert layer.kernel_b.shape == (3, 6)
    kernel = np.einsum("cdr,re->cde", layer.kernel_a.numpy(), layer.kernel_b.numpy())
    # float32 einsum in two steps vs one: 1e-5 covers the changed summation order.
    np.testing.assert_allclose(y, np.einsum("abcd,cde->abe", x, kernel), atol=1e-5)


def test_einsum_kernel_matrix_view_round_trip():
    layer = CompressedEinsumDense("abcd,dce->abe", output_shape=(None, 3))
    layer(tf.zeros([1, 2, 4, 5]))
    kernel = layer.kernel.numpy()
    matrix = layer.kernel_as_matrix("kernel", kernel)
    assert matrix.shape == (20, 3)
    # Rows follow the kernel's contracted axes in kernel order (d, then c).
    np.testing.assert_array_equal(matrix[1 * 4 + 2], kernel[1, 2])
    np.testing.assert_array_equal(layer.matrix_as_kernel("kernel", matrix), kernel)
    np.testing.assert_array_equal(einsum_kernel_as_matrix(layer.equation, kernel), matrix)


def test_per_head_kernel_has_no_matrix_view():
    with pytest.raises(NotImplementedError, match="batch of matrices"):
        LowRankEinsumDense("abnh,nhd->abnd", output_shape=(None, 2, 3), rank=2)


def test_kernel_transforms_validation():
    with pytest.raises(ValueError, match=r"unknown kernels \['kernel'\].*kernel_a"):
        LowRankDense(4, 2, kernel_transforms={"kernel": [PruningMask(sparsity=0.5)]})
    with pytest.raises(ValueError, match="Unknown kernel transform 'Nope'"):
        CompressedDense(4, kernel_transforms=[{"class_name": "Nope", "config": {}}])
    with pytest.raises(ValueError, match="units must be a positive integer; received 0"):
        CompressedDense(0)
    with pytest.raises(ValueError, match="rank must be a positive integer; received -1"):
        LowRankDense(4, -1)


def test_list_transforms_are_copied_per_kernel():
    mask = PruningMask(sparsity=0.25)
    layer = LowRankDense(4, 2, kernel_transforms=[mask])
    layer(tf.zeros([1, 6]))
    first, second = layer.transforms["kernel_a"][0], layer.transforms["kernel_b"][0]
    assert first is not second
    assert first is not mask
    assert first.mask.shape == (6, 2)
    assert second.mask.shape == (2, 4)
    assert serialize_transform(first) == {
        "class_name": "PruningMask",
        "config": {"sparsity": 0.25, "pattern": None, "method": "magnitude",
                   "schedule": None}}
    assert deserialize_transform(serialize_transform(first)).get_config() == first.get_config()


@register_transform
class _Doubling(KernelTransform):
    """A kept transform, to test that strip keeps and copies what strip() returns."""

    def build(self, layer, kernel_name, kernel_shape):
        super().build(layer, kernel_name, kernel_shape)
        self.add_variable(layer, kernel_name, "factor", (), initializer="ones")

    def __call__(self, kernel, training):
        return kernel * self.variables["factor"]

    def strip(self):
        return _Doubling()


def test_strip_folds_masks_and_keeps_others():
    x = np.random.default_rng(5).normal(size=(3, 6)).astype("float32")
    layer = CompressedDense(4, kernel_transforms=[PruningMask(sparsity=0.5), _Doubling()],
                            name="proj")
    layer(x)
    layer.transforms["kernel"][0].mask.assign(
        (np.arange(24).reshape(6, 4) % 2).astype("float32"))
    layer.transforms["kernel"][1].variables["factor"].assign(3.0)
    stripped = strip_layer(layer)
    assert isinstance(stripped, CompressedDense)
    assert [type(t) for t in stripped.transforms["kernel"]] == [_Doubling]
    names = [v.name for v in stripped.weights]
    assert not any("mask" in n for n in names)
    assert stripped.transforms["kernel"][0].variables["factor"].numpy() == 3.0
    np.testing.assert_array_equal(stripped.kernel.numpy(),
                                  layer.kernel.numpy() * (np.arange(24).reshape(6, 4) % 2))
    np.testing.assert_allclose(stripped(x).numpy(), layer(x).numpy(), atol=1e-6)


def test_strip_gives_standard_keras_layers():
    dense = CompressedDense(4, name="a/b", kernel_transforms=[PruningMask(sparsity=0.5)])
    dense(tf.ones([1, 6]))
    stripped = strip_layer(dense)
    assert type(stripped) is keras.layers.Dense
    assert stripped.name == "a/b"
    einsum = CompressedEinsumDense("abc,cd->abd", output_shape=(None, 3), bias_axes="d",
                                   kernel_transforms=[PruningMask(sparsity=0.5)])
    einsum(tf.ones([1, 2, 6]))
    assert type(strip_layer(einsum)) is keras.layers.EinsumDense
    plain = keras.layers.Dense(2)
    assert strip_layer(plain) is plain


def test_sizes_exclude_dropped_transform_state():
    layer = CompressedDense(8, kernel_transforms=[PruningMask(sparsity=0.5)])
    layer(tf.zeros([1, 16]))
    # kernel 16*8 + bias 8, float32; the mask (another 128 floats) is training state.
    assert layer.parameter_count() == 136
    assert layer.compressed_bytes() == 136 * 4
    low = LowRankDense(8, rank=2)
    low(tf.zeros([1, 16]))
    assert low.parameter_count() == 2 * (16 + 8) + 8


def test_prunable_layer_interface_with_tfmot():
    import tensorflow_model_optimization as tfmot

    inputs = keras.Input((8,))
    x = CompressedDense(16, name="dense")(inputs)
    outputs = LowRankDense(4, rank=2, name="low")(x)
    model = keras.Model(inputs, outputs)
    assert model.get_layer("low").get_prunable_weights() == [
        model.get_layer("low").kernel_a, model.get_layer("low").kernel_b]
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0, frequency=1)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    pruned.compile("sgd", "mse")
    x_train = np.random.default_rng(6).normal(size=(8, 8)).astype("float32")
    y_train = np.zeros((8, 4), "float32")
    pruned.fit(x_train, y_train, epochs=1, batch_size=4, verbose=0,
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    kernel = stripped.get_layer("dense").kernel.numpy()
    # tfmot prunes 50% of each prunable weight: 64 of 8x16, 16 of 16x2, 4 of 2x4.
    assert int(np.sum(kernel == 0)) == 64
    assert int(np.sum(stripped.get_layer("low").kernel_a.numpy() == 0)) == 16
    assert int(np.sum(stripped.get_layer("low").kernel_b.numpy() == 0)) == 4


def test_mixed_precision_keeps_float32_kernels():
    keras.mixed_precision.set_global_policy("mixed_float16")
    layer = LowRankDense(4, rank=2, kernel_transforms=[PruningMask(sparsity=0.5)])
    y = layer(tf.ones([2, 6]))
    assert y.dtype == tf.float16
    assert layer.kernel_a.dtype == tf.float32
    assert layer.transforms["kernel_a"][0].mask.dtype == tf.float32
