"""Low-rank factorization of Dense, EinsumDense and Embedding layers.

A kernel W [in, out] (an EinsumDense kernel viewed as [contracted dims, output dims]) is
replaced by A [in, r] and B [r, out] from its truncated SVD ``W = U S V^T``:

    A = U_r sqrt(S_r),   B = sqrt(S_r) V_r^T.

The square root is split evenly so that both factors have the same column / row scale.
Their per-channel ranges then match, which keeps int8 fake quantization and magnitude
pruning of either factor from favouring one side, and their gradients are of similar
size during recovery fine-tuning. By Eckart-Young, ``||W - A B||_F`` equals
``sqrt(sum_{i>r} s_i^2)``, the smallest error of any rank-r matrix.

The activation-aware variant (``method="activation"``) minimises the output error on
calibration inputs X [n, in] instead: ``||X W - X A B||_F^2 = n ||L^T (W - A B)||_F^2``
with ``L L^T = C + eps I`` and ``C = X^T X / n``. So the SVD ``L^T W = U S V^T`` is
truncated and mapped back, giving ``A = L^{-T} U_r sqrt(S_r)`` and ``B = sqrt(S_r) V_r^T``.
This is truncation in the whitened input space. ``eps`` is 1e-6 times the mean diagonal
of C, so that the Cholesky factor exists when some inputs never vary.

What this module adds to Keras and tfmot (which has no low-rank tools): the factored
layers' factories, rank choice by count, kept spectral energy or a whole-model parameter
budget, and ``FactorizedEmbedding``.
"""

import heapq
import logging
import warnings

import numpy as np

from tfcompress._keras import keras, tf
from tfcompress.layers.base import (
    CompressedDense,
    CompressedEinsumDense,
    KernelLayer,
    LowRankDense,
    LowRankEinsumDense,
    _check_positive_int,
    _dense_config_items,
    einsum_input_shape,
    einsum_kernel_as_matrix,
    input_gram,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FactorizedEmbedding",
    "low_rank",
    "select_ranks",
    "rank_for_energy",
    "factorize",
]

_METHODS = ("svd", "activation")


@keras.utils.register_keras_serializable(package="tfcompress")
class FactorizedEmbedding(KernelLayer):
    """An embedding table stored as [input_dim, rank] rows times a [rank, output_dim] map.

    ``outputs = embeddings[ids] @ projection`` (the factorized embedding of ALBERT). It
    stores rank * (input_dim + output_dim) weights instead of input_dim * output_dim.

    Args:
      input_dim: vocabulary size.
      output_dim: width of the output vectors.
      rank: inner width r.
      embeddings_initializer: initializer of the [input_dim, rank] table.
      projection_initializer: initializer of the [rank, output_dim] projection.
      mask_zero: whether id 0 is padding and produces a Keras mask, as keras Embedding.
      kernel_transforms: see ``KernelLayer``.

    Input shape: integer ids [...]. Output shape: [..., output_dim] in the compute dtype.
    """

    kernel_names = ("embeddings", "projection")

    def __init__(self, input_dim, output_dim, rank, embeddings_initializer="uniform",
                 projection_initializer="glorot_uniform", mask_zero=False,
                 kernel_transforms=None, **kwargs):
        kwargs.pop("input_quantizer", None)
        super().__init__(kernel_transforms=kernel_transforms, **kwargs)
        self.input_dim = _check_positive_int(input_dim, "input_dim")
        self.output_dim = _check_positive_int(output_dim, "output_dim")
        self.rank = _check_positive_int(rank, "rank")
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.projection_initializer = keras.initializers.get(projection_initializer)
        self.mask_zero = bool(mask_zero)
        self.supports_masking = self.mask_zero

    def build(self, input_shape=None):
        self.add_kernel("embeddings", [self.input_dim, self.rank],
                        self.embeddings_initializer)
        self.add_kernel("projection", [self.rank, self.output_dim],
                        self.projection_initializer)
        super().build(input_shape)

    def call(self, inputs, training=None):
        ids = tf.cast(inputs, tf.int32)
        rows = tf.gather(self.compute_kernel("embeddings", training), ids)
        projection = self.compute_kernel("projection", training)
        return tf.tensordot(rows, projection, [[rows.shape.rank - 1], [0]])

    def compute_mask(self, inputs, mask=None):
        if not self.mask_zero:
            return None
        return tf.not_equal(inputs, 0)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape).concatenate([self.output_dim])

    def get_config(self):
        config = super().get_config()
        config.pop("input_quantizer")
        config.update(
            input_dim=self.input_dim, output_dim=self.output_dim, rank=self.rank,
            embeddings_initializer=keras.initializers.serialize(self.embeddings_initializer),
            projection_initializer=keras.initializers.serialize(self.projection_initializer),
            mask_zero=self.mask_zero)
        return config


# ---- math ----------------------------------------------------------------------------------

def rank_for_energy(singular_values, energy):
    """Return the smallest r with ``sum_{i<=r} s_i^2 / sum_i s_i^2 >= energy``."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1]; received energy={energy!r}.")
    squares = np.square(np.asarray(singular_values, dtype=np.float64))
    total = squares.sum()
    if total == 0.0:
        return 1
    kept = np.cumsum(squares) / total
    # The relative 1e-12 absorbs rounding in the cumulative sum, so energy=1.0 and an
    # energy exactly at a partial sum select that rank instead of the next one.
    return int(np.searchsorted(kept, energy - 1e-12) + 1)


def thin_svd(matrix):
    """Return the thin SVD ``(U, s, Vt)`` of a 2-D matrix, in float64, s descending.

    It goes through the eigendecomposition of the smaller Gram matrix instead of
    ``np.linalg.svd``: with the OpenBLAS 0.3.31 that numpy 2.4 ships, gesdd took 49 s on
    a 30522x384 word-embedding table on 2 cores, this 0.4 s. In float64 the Gram route
    only loses singular values below about 1e-8 of the largest, which truncation drops.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    wide = matrix.shape[0] < matrix.shape[1]
    tall = matrix.T if wide else matrix
    eigenvalues, vectors = np.linalg.eigh(tall.T @ tall)
    order = np.argsort(eigenvalues)[::-1]
    singular = np.sqrt(np.clip(eigenvalues[order], 0.0, None))
    vectors = vectors[:, order]
    # Columns for zero singular values stay zero; they carry no weight in U diag(s) Vt.
    left = (tall @ vectors) / np.where(singular > 0.0, singular, 1.0)
    if wide:
        return vectors, singular, left.T
    return left, singular, vectors.T


def factorize(matrix, rank, gram=None, rows=None):
    """Return the float32 factors (A [in, rank], B [rank, out]) of a 2-D kernel matrix.

    Without ``gram`` this is the truncated SVD with balanced factors. With ``gram``
    (X^T X of ``rows`` calibration inputs) the factors minimise the output error on those
    inputs, as the module docstring explains.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if gram is None:
        u, s, vt = thin_svd(matrix)
        root = np.sqrt(s[:rank])
        return ((u[:, :rank] * root).astype(np.float32),
                (root[:, None] * vt[:rank]).astype(np.float32))

    covariance = gram / rows
    eps = 1e-6 * max(float(np.trace(covariance)) / covariance.shape[0], 1e-30)
    lower = np.linalg.cholesky(covariance + eps * np.eye(covariance.shape[0]))
    u, s, vt = thin_svd(lower.T @ matrix)
    root = np.sqrt(s[:rank])
    # A = L^{-T} U_r sqrt(S_r), solved instead of inverting L.
    a = np.linalg.solve(lower.T, u[:, :rank] * root)
    return a.astype(np.float32), (root[:, None] * vt[:rank]).astype(np.float32)


def _check_rank(rank, rows, columns, force, layer_name):
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not (
            1 <= rank <= min(rows, columns)):
        raise ValueError(
            f"Layer {layer_name!r}: rank must be in [1, {min(rows, columns)}] for a "
            f"{rows}x{columns} kernel; received rank={rank!r}.")
    if rank * (rows + columns) >= rows * columns and not force:
        largest = (rows * columns - 1) // (rows + columns)
        raise ValueError(
            f"Layer {layer_name!r}: rank={rank} stores {rank * (rows + columns)} weights "
            f"for a {rows}x{columns} kernel of {rows * columns}, so it saves nothing. Use "
            f"rank <= {largest}, or force=True to factor anyway.")
    return int(rank)


# ---- sources -------------------------------------------------------------------------------

def _source_matrix(layer):
    """Return the [in, out] kernel matrix of a source layer and the kernel transforms lost."""
    if isinstance(layer, keras.layers.Embedding):
        return layer.embeddings.numpy(), False
    if isinstance(layer, keras.layers.Dense):
        return layer.kernel.numpy(), False
    if isinstance(layer, keras.layers.EinsumDense):
        return einsum_kernel_as_matrix(layer.equation, layer.kernel.numpy()), False
    if isinstance(layer, (CompressedDense, CompressedEinsumDense)):
        kernel = layer.effective_kernel("kernel", training=False).numpy()
        return layer.kernel_as_matrix("kernel", kernel), bool(layer.transforms["kernel"])
    if isinstance(layer, (LowRankDense, LowRankEinsumDense, FactorizedEmbedding)):
        first, second = (layer.effective_kernel(n, training=False).numpy()
                         for n in layer.kernel_names)
        matrix = (layer.kernel_as_matrix(layer.kernel_names[0], first)
                  @ layer.kernel_as_matrix(layer.kernel_names[1], second))
        return matrix, any(layer.transforms[n] for n in layer.kernel_names)
    raise TypeError(
        f"low_rank accepts keras Dense, EinsumDense and Embedding layers and the tfcompress "
        f"structure layers; received {type(layer).__name__} ({layer.name!r}).")


def _build_factored(layer, rank, a, b):
    """Create the factored layer of ``layer``'s kind, named like it, with A, B and bias set."""
    common = dict(name=layer.name, dtype=layer.dtype_policy)
    if isinstance(layer, (keras.layers.Embedding, FactorizedEmbedding)):
        new = FactorizedEmbedding(
            a.shape[0], b.shape[1], rank, embeddings_initializer=layer.embeddings_initializer,
            mask_zero=layer.mask_zero, **common)
        new.build(None)
        new.embeddings.assign(a)
        new.projection.assign(b)
        return new

    dense_items = _dense_config_items(layer)
    if isinstance(layer, (keras.layers.Dense, CompressedDense, LowRankDense)):
        new = LowRankDense(layer.units, rank, **dense_items, **common)
        new.build([None, a.shape[0]])
    else:
        dense_items.pop("use_bias", None)
        new = LowRankEinsumDense(layer.equation, layer.partial_output_shape, rank,
                                 bias_axes=layer.bias_axes, **dense_items, **common)
        new.build(einsum_input_shape(layer))
    new.kernel_a.assign(np.reshape(a, new.kernel_a.shape))
    new.kernel_b.assign(np.reshape(b, new.kernel_b.shape))
    if new.bias is not None:
        new.bias.assign(layer.bias.numpy())
    return new


def low_rank(layer, rank=None, energy=None, calibration_inputs=None, method="svd",
             force=False):
    """Return a new built factored copy of ``layer`` (the source is left untouched).

    Args:
      layer: a built keras Dense, EinsumDense or Embedding, or a tfcompress structure layer.
        Dense-like layers become ``LowRankDense``, EinsumDense-like ones
        ``LowRankEinsumDense``, embeddings ``FactorizedEmbedding``. A factored source is
        factored again (to lower its rank). Kernel transforms of the source are applied
        to its kernel first and not carried over, with a warning.
      rank: the rank r. Exactly one of ``rank`` and ``energy`` is given.
      energy: the fraction of spectral energy to keep; r is the smallest rank with
        ``sum_{i<=r} s_i^2 / sum s_i^2 >= energy``.
      calibration_inputs: the layer's own inputs, needed by ``method="activation"``.
      method: ``"svd"`` (plain truncated SVD) or ``"activation"`` (minimise the output
        error on ``calibration_inputs``). Energy is measured on the spectrum the method
        truncates.
      force: factor even when the rank does not save parameters.

    Returns:
      The factored layer, named like the source, with the source's bias and activation.
    """
    if (rank is None) == (energy is None):
        raise ValueError(
            f"Pass exactly one of rank and energy; received rank={rank!r}, energy={energy!r}.")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; received method={method!r}.")
    if not getattr(layer, "built", False):
        raise ValueError(
            f"Layer {getattr(layer, 'name', layer)!r} must be built (called once or built "
            "with its input shape) before it is factored.")
    is_embedding = isinstance(layer, (keras.layers.Embedding, FactorizedEmbedding))
    if method == "activation" and is_embedding:
        raise NotImplementedError(
            f"Layer {layer.name!r} is an embedding, which has no input covariance to weight "
            "by; use method='svd' for embeddings.")

    matrix, lost_transforms = _source_matrix(layer)
    if lost_transforms:
        warnings.warn(
            f"Layer {layer.name!r}: its kernel transforms are applied to the kernel before "
            "factoring and are not carried over. Add pruning or quantization after "
            "low_rank so that they act on the factors.", stacklevel=2)
    if getattr(layer, "input_quantizer", None) is not None:
        warnings.warn(
            f"Layer {layer.name!r}: its input quantizer is not carried over; quantize the "
            "factored layer instead.", stacklevel=2)
    rows, columns = matrix.shape

    gram = count = None
    if method == "activation":
        gram, count = input_gram(layer, calibration_inputs)
        if gram.shape[0] != rows:
            raise ValueError(
                f"Layer {layer.name!r}: calibration inputs have {gram.shape[0]} features but "
                f"the kernel has {rows} input rows.")

    if energy is not None:
        if method == "activation":
            covariance = gram / count
            eps = 1e-6 * max(float(np.trace(covariance)) / rows, 1e-30)
            lower = np.linalg.cholesky(covariance + eps * np.eye(rows))
            spectrum = thin_svd(lower.T @ matrix)[1]
        else:
            spectrum = thin_svd(matrix)[1]
        rank = rank_for_energy(spectrum, energy)
        logger.info("Layer %s: energy %.4f keeps rank %d of %d.", layer.name, energy, rank,
                    min(rows, columns))
    rank = _check_rank(rank, rows, columns, force, layer.name)

    a, b = factorize(matrix, rank, gram, count)
    return _build_factored(layer, rank, a, b)


def select_ranks(layers, budget):
    """Choose one rank per layer with the least total error under a parameter budget.

    The cost of rank r for a kernel of [in, out] is ``r * (in + out)`` parameters, and
    the squared Frobenius error is ``sum_{i>r} s_i^2`` (Eckart-Young). Every layer gets
    rank 1 first. Then the next rank unit is given, greedily, to the layer whose next
    singular value buys the most error reduction per parameter, ``s_{r+1}^2 / (in +
    out)``, while ``sum_l r_l * (in_l + out_l) <= budget`` and the rank still saves
    parameters. Each layer's gains decrease with r, so the greedy choice is exact when all
    layers have the same in + out, and otherwise it is the greedy knapsack approximation.

    Args:
      layers: built layers accepted by ``low_rank`` (their names must be unique).
      budget: the largest total number of factor parameters (biases not counted).

    Returns:
      A dict ``{layer.name: rank}``.
    """
    layers = list(layers)
    if not layers:
        raise ValueError("select_ranks needs at least one layer; received none.")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError(f"Layer names must be unique; received {names}.")
    _check_positive_int(budget, "budget")

    spectra, costs, caps = [], [], []
    for layer in layers:
        matrix, _ = _source_matrix(layer)
        rows, columns = matrix.shape
        spectra.append(np.square(thin_svd(matrix)[1]))
        costs.append(rows + columns)
        caps.append(max(1, (rows * columns - 1) // (rows + columns)))

    minimum = sum(costs)
    if budget < minimum:
        raise ValueError(
            f"budget={budget} is below {minimum}, the parameters of rank 1 for every "
            "layer; raise the budget or factor fewer layers.")

    ranks = [1] * len(layers)
    used = minimum
    # Max-heap on the gain per parameter of each layer's next rank unit. A tie goes to the
    # earlier layer, because the heap compares the layer index next.
    heap = [(-spectra[i][1] / costs[i], i) for i in range(len(layers))
            if caps[i] > 1 and len(spectra[i]) > 1]
    heapq.heapify(heap)
    skipped = []
    while heap:
        _, i = heapq.heappop(heap)
        if used + costs[i] > budget:
            skipped.append(i)
            continue
        ranks[i] += 1
        used += costs[i]
        if ranks[i] < caps[i] and ranks[i] < len(spectra[i]):
            heapq.heappush(heap, (-spectra[i][ranks[i]] / costs[i], i))
    logger.info("select_ranks: %d of %d parameters used; ranks %s.", used, budget,
                dict(zip(names, ranks)))
    return dict(zip(names, ranks))
