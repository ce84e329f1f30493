"""Tests of tfcompress.layers.lowrank: SVD factors, rank choice, activation-aware, embeddings."""

import itertools
import os

import numpy as np
import pytest

from tfcompress._keras import keras
from tfcompress.layers import (
    FactorizedEmbedding,
    LowRankDense,
    LowRankEinsumDense,
    PruningMask,
    low_rank,
    rank_for_energy,
    select_ranks,
)


def _orthonormal(rng, rows, columns):
    q, _ = np.linalg.qr(rng.normal(size=(rows, columns)))
    return q


def _dense_with_kernel(kernel, bias=True, name=None):
    layer = keras.layers.Dense(kernel.shape[1], use_bias=bias, name=name)
    layer.build((None, kernel.shape[0]))
    weights = [kernel.astype("float32")]
    if bias:
        weights.append(np.linspace(-1, 1, kernel.shape[1]).astype("float32"))
    layer.set_weights(weights)
    return layer


def _kernel_with_spectrum(rng, rows, columns, singular_values):
    u = _orthonormal(rng, rows, len(singular_values))
    v = _orthonormal(rng, columns, len(singular_values))
    return (u * singular_values) @ v.T


def test_eckart_young_error_of_factors():
    rng = np.random.default_rng(0)
    s = np.linspace(10.0, 0.5, 32)
    kernel = _kernel_with_spectrum(rng, 48, 32, s)
    source = _dense_with_kernel(kernel, name="ffn")
    for rank in (1, 8, 16):
        layer = low_rank(source, rank=rank)
        assert isinstance(layer, LowRankDense)
        assert layer.name == "ffn"
        assert layer.rank == rank
        product = layer.kernel_a.numpy().astype(np.float64) @ layer.kernel_b.numpy()
        error = np.linalg.norm(kernel - product)
        expected = np.sqrt(np.sum(s[rank:] ** 2))
        # Factors are stored in float32: 1e-5 relative is well above its rounding.
        np.testing.assert_allclose(error, expected, rtol=1e-5)
        # Balanced factors: column norms of A equal row norms of B (both sqrt(s_i)).
        np.testing.assert_allclose(np.linalg.norm(layer.kernel_a.numpy(), axis=0),
                                   np.linalg.norm(layer.kernel_b.numpy(), axis=1), rtol=1e-5)
    np.testing.assert_array_equal(layer.bias.numpy(), source.bias.numpy())
    assert source.kernel.shape == (48, 32)


def test_rank_for_energy_on_known_spectrum():
    s = [4.0, 3.0, 2.0, 1.0]  # squares 16, 9, 4, 1 of total 30
    assert rank_for_energy(s, 0.5) == 1  # 16/30 = 0.533
    assert rank_for_energy(s, 0.6) == 2
    assert rank_for_energy(s, 25 / 30) == 2  # exactly the partial sum
    assert rank_for_energy(s, 0.84) == 3
    assert rank_for_energy(s, 1.0) == 4
    with pytest.raises(ValueError, match="energy must be in \\(0, 1\\]; received energy=1.5"):
        rank_for_energy(s, 1.5)


def test_energy_selects_rank_through_low_rank():
    rng = np.random.default_rng(1)
    s = np.array([4.0, 3.0, 2.0, 1.0] + [0.0] * 12)
    source = _dense_with_kernel(_kernel_with_spectrum(rng, 16, 16, s))
    assert low_rank(source, energy=0.84).rank == 3
    assert low_rank(source, energy=0.5).rank == 1


def test_rank_range_and_saving_checks():
    source = _dense_with_kernel(np.random.default_rng(2).normal(size=(8, 12)), name="proj")
    with pytest.raises(ValueError, match=r"rank must be in \[1, 8\] for a 8x12 kernel; "
                                         r"received rank=9"):
        low_rank(source, rank=9, force=True)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 8\].*received rank=0"):
        low_rank(source, rank=0)
    # 5 * (8 + 12) = 100 >= 96 weights: no saving.
    with pytest.raises(ValueError, match=r"rank=5 stores 100 weights.*of 96.*rank <= 4"):
        low_rank(source, rank=5)
    assert low_rank(source, rank=4).rank == 4
    full = low_rank(source, rank=8, force=True)
    np.testing.assert_allclose(full.kernel_a.numpy() @ full.kernel_b.numpy(),
                               source.kernel.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="exactly one of rank and energy"):
        low_rank(source, rank=2, energy=0.9)
    with pytest.raises(ValueError, match="method must be one of"):
        low_rank(source, rank=2, method="qr")


def test_activation_aware_beats_svd_on_output_error():
    rng = np.random.default_rng(3)
    # Anisotropic inputs: feature scales from 30 down to 0.03.
    scales = np.geomspace(30.0, 0.03, 32)
    x = rng.normal(size=(512, 32)) * scales
    source = _dense_with_kernel(rng.normal(size=(32, 24)), bias=False)
    reference = x @ source.kernel.numpy()
    errors = {}
    for method in ("svd", "activation"):
        layer = low_rank(source, rank=6, method=method,
                         calibration_inputs=[x[:256].astype("float32"),
                                             x[256:].astype("float32")])
        product = layer.kernel_a.numpy().astype(np.float64) @ layer.kernel_b.numpy()
        errors[method] = np.linalg.norm(reference - x @ product)
    assert errors["activation"] < 0.5 * errors["svd"]
    with pytest.raises(ValueError, match="calibration_inputs are required"):
        low_rank(source, rank=6, method="activation")


def test_einsum_low_rank_keeps_equation():
    rng = np.random.default_rng(4)
    source = keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 2, 4),
                                      bias_axes="de", name="query")
    x = rng.normal(size=(2, 5, 16)).astype("float32")
    source(x)
    full = low_rank(source, rank=8, force=True)
    assert isinstance(full, LowRankEinsumDense)
    assert full.kernel_a.shape == (16, 8)
    assert full.kernel_b.shape == (8, 2, 4)
    # A full-rank factorization is exact up to float32 rounding of the factors.
    np.testing.assert_allclose(full(x).numpy(), source(x).numpy(), atol=1e-5)
    matrix = source.kernel.numpy().reshape(16, 8)
    s = np.linalg.svd(matrix, compute_uv=False)
    three = low_rank(source, rank=3, force=True)
    product = three.kernel_a.numpy() @ three.kernel_b.numpy().reshape(3, 8)
    np.testing.assert_allclose(np.linalg.norm(matrix - product),
                               np.sqrt(np.sum(s[3:] ** 2)), rtol=1e-5)


def test_select_ranks_respects_budget_and_is_optimal():
    rng = np.random.default_rng(5)
    # Equal in + out = 40 for every layer, where the greedy choice is exact.
    shapes = [(24, 16), (20, 20), (30, 10)]
    layers = [_dense_with_kernel(rng.normal(size=shape) * (i + 1), name=f"layer_{i}")
              for i, shape in enumerate(shapes)]
    budget = 40 * 9 + 17
    ranks = select_ranks(layers, budget)
    used = sum(ranks[layer.name] * sum(shape) for layer, shape in zip(layers, shapes))
    assert used <= budget
    assert used == 40 * 9

    spectra = [np.linalg.svd(layer.kernel.numpy().astype(np.float64), compute_uv=False) ** 2
               for layer in layers]
    caps = [(r * c - 1) // (r + c) for r, c in shapes]
    best = None
    for choice in itertools.product(*(range(1, cap + 1) for cap in caps)):
        if sum(choice) * 40 > budget:
            continue
        error = sum(spectrum[rank:].sum() for spectrum, rank in zip(spectra, choice))
        if best is None or error < best[0]:
            best = (error, choice)
    assert tuple(ranks[layer.name] for layer in layers) == best[1]

    with pytest.raises(ValueError, match="budget=100 is below 120"):
        select_ranks(layers, 100)


def test_factorized_embedding_from_table(tmp_path):
    rng = np.random.default_rng(6)
    table = keras.layers.Embedding(50, 16, mask_zero=True, name="word_embeddings")
    table.build(None)
    table.set_weights([rng.normal(size=(50, 16)).astype("float32")])
    factored = low_rank(table, rank=4)
    assert isinstance(factored, FactorizedEmbedding)
    assert factored.parameter_count() == 4 * (50 + 16)
    ids = np.array([[3, 7, 0]])
    u, s, vt = np.linalg.svd(table.embeddings.numpy().astype(np.float64), full_matrices=False)
    expected = (u[:, :4] * s[:4]) @ vt[:4]
    # float32 factors against the float64 truncated SVD.
    np.testing.assert_allclose(factored(ids).numpy()[0], expected[[3, 7, 0]], atol=1e-5)
    np.testing.assert_array_equal(factored.compute_mask(ids).numpy(), [[True, True, False]])
    with pytest.raises(NotImplementedError, match="use method='svd' for embeddings"):
        low_rank(table, rank=4, method="activation", calibration_inputs=ids)


@pytest.mark.parametrize("fmt", ["keras", "savedmodel"])
def test_factored_model_reloads(tmp_path, fmt):
    ids = keras.Input((6,), dtype="int32")
    hidden = FactorizedEmbedding(30, 8, rank=3, name="embed",
                                 kernel_transforms={"projection": [PruningMask(sparsity=0.5)]})(ids)
    outputs = LowRankDense(4, rank=2, activation="tanh", name="head")(hidden)
    model = keras.Model(ids, outputs)
    rng = np.random.default_rng(7)
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.weights])
    x = rng.integers(0, 30, size=(2, 6)).astype("int32")
    path = os.path.join(tmp_path, "model.keras" if fmt == "keras" else "saved")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_layer("embed").get_config() == model.get_layer("embed").get_config()
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    for original, reloaded in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(original, reloaded)
