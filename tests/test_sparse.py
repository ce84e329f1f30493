"""Tests of tfcompress.layers.sparse: SparseDense parity, stored bytes, reload."""

import os

import numpy as np
import pytest

from tfcompress._keras import keras, tf
from tfcompress.layers import SparseDense, prune, strip_layer, to_sparse


def _pruned_dense(sparsity, rows=64, columns=32, seed=0):
    source = keras.layers.Dense(columns, activation="relu", name="ffn")
    source.build((None, rows))
    rng = np.random.default_rng(seed)
    source.set_weights([rng.normal(size=(rows, columns)).astype("float32"),
                        rng.normal(size=columns).astype("float32")])
    return prune(source, sparsity=sparsity)


def test_parity_with_masked_dense():
    pruned = _pruned_dense(0.75)
    sparse = to_sparse(pruned)
    assert isinstance(sparse, SparseDense)
    assert sparse.name == "ffn"
    assert sparse.nnz == 64 * 32 // 4
    np.testing.assert_array_equal(sparse.dense_kernel(),
                                  pruned.effective_kernel("kernel").numpy())
    x = np.random.default_rng(1).normal(size=(3, 5, 64)).astype("float32")
    # Same products summed in another order: 1e-5 covers float32 reassociation.
    np.testing.assert_allclose(sparse(x).numpy(), pruned(x).numpy(), atol=1e-5)


def test_stored_bytes_scale_with_nnz():
    sizes = {}
    for sparsity in (0.6, 0.75, 0.9):
        sparse = to_sparse(_pruned_dense(sparsity))
        assert sparse.indices.dtype == tf.int16
        sizes[sparse.nnz] = sparse.compressed_bytes()
    for nnz, size in sizes.items():
        # float32 value + two int16 indices per nonzero, plus a float32 bias of 32.
        assert size == nnz * (4 + 2 * 2) + 32 * 4
    assert sorted(sizes) == [205, 512, 819]
    assert to_sparse(_pruned_dense(0.9)).parameter_count() == 205 + 32


def test_int32_indices_for_wide_kernels():
    layer = SparseDense(40000, nnz=3)
    layer.build((None, 4))
    assert layer.indices.dtype == tf.int32
    assert layer.compressed_bytes() == 3 * (4 + 2 * 4) + 40000 * 4
    with pytest.raises(ValueError, match="int16 indices cannot address a 4x40000 kernel"):
        SparseDense(40000, nnz=3, index_dtype="int16").build((None, 4))


def test_argument_checks():
    with pytest.raises(ValueError, match="nnz must be a non-negative integer; received nnz=-1"):
        SparseDense(4, nnz=-1)
    with pytest.raises(TypeError, match="to_sparse accepts keras Dense and CompressedDense"):
        to_sparse(keras.layers.EinsumDense("ab,bc->ac", output_shape=4))


def test_dense_storage_warning():
    with pytest.warns(UserWarning, match="not less than the .* bytes of the dense kernel"):
        to_sparse(_pruned_dense(0.25))


def test_mixed_float16_and_training():
    keras.mixed_precision.set_global_policy("mixed_float16")
    sparse = to_sparse(_pruned_dense(0.75))
    model = keras.Sequential([keras.Input((64,)), sparse,
                              keras.layers.Dense(1, dtype="float32")])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    before = sparse.values.numpy().copy()
    model.fit(np.ones((4, 64), "float32"), np.ones((4, 1), "float32"), verbose=0)
    assert sparse(tf.ones([1, 64])).dtype == tf.float16
    assert sparse.values.dtype == tf.float32
    assert not np.array_equal(before, sparse.values.numpy())
    assert strip_layer(sparse) is sparse


@pytest.mark.parametrize("fmt", ["keras", "savedmodel"])
def test_reload_without_custom_objects(tmp_path, fmt):
    sparse = to_sparse(_pruned_dense(0.8))
    model = keras.Sequential([keras.Input((7, 64)), sparse])
    x = np.random.default_rng(2).normal(size=(2, 7, 64)).astype("float32")
    path = os.path.join(tmp_path, "model.keras" if fmt == "keras" else "saved")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.layers[0].get_config() == sparse.get_config()
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    for original, reloaded in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(original, reloaded)
