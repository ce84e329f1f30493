"""Weight pruning as a kernel transform: one-shot, N:M, activation-aware and gradual.

``PruningMask`` multiplies a kernel by a non-trainable float32 mask of the same shape, so
pruned weights get zero gradient and stay out of the output. Masks are chosen by:

- magnitude: the ``k = floor(sparsity * n + 0.5)`` weights of smallest ``|W|`` in the
  kernel are zeroed. Ties go in flat (row-major) index order, so the lower index is
  pruned first and the count is exact.
- N:M (``pattern="2:4"``): in every group of M consecutive input rows of one output
  column, the N largest scores are kept (the 2:4 pattern of NVIDIA sparse tensor cores).
  A tie keeps the lower row.
- activation (the Wanda method): the score is ``|W_ij| * ||X_i||_2``, where ``X_i`` is input
  feature i over all calibration tokens. Scores are compared within each output column j,
  and the k lowest of each column are zeroed.
- gradual: a tfmot ``ConstantSparsity`` or ``PolynomialDecay`` schedule gives
  ``(should_prune, sparsity) = schedule(step)``. The ``PruningStep`` callback increments
  the ``{kernel}_pruning_step`` variable before every training batch and recomputes the
  magnitude mask of the masked kernel at the steps where the schedule prunes.

What this module adds to tfmot: masks as composable transforms on our structure layers
(tfmot's wrapper cannot sit inside a transformer graph with residual TFOpLambda layers),
exact-count and Wanda masks, and one-shot pruning at compress time. The schedules are
tfmot's own.
"""

import logging
import math

import numpy as np
from tensorflow_model_optimization.sparsity.keras import (
    ConstantSparsity,
    PolynomialDecay,
    PruningSchedule,
)

from tfcompress._keras import keras, tf
from tfcompress.layers.base import (
    CompressedDense,
    CompressedEinsumDense,
    KernelLayer,
    KernelTransform,
    LowRankDense,
    LowRankEinsumDense,
    _dense_config_items,
    einsum_input_shape,
    input_gram,
    register_transform,
    serialize_transform,
)
from tfcompress.layers.lowrank import FactorizedEmbedding

logger = logging.getLogger(__name__)

__all__ = [
    "PruningMask",
    "PruningStep",
    "prune",
    "has_scheduled_pruning",
    "magnitude_mask",
    "n_m_mask",
    "column_mask",
    "parse_pattern",
    "kernel_sparsity",
]

_SCHEDULES = {"ConstantSparsity": ConstantSparsity, "PolynomialDecay": PolynomialDecay}
_PRUNE_METHODS = ("magnitude", "activation", "wanda")


# ---- mask math (numpy, deterministic) --------------------------------------------------------

def _pruned_count(sparsity, size):
    # Round half up, so a 0.5 sparsity of an odd size prunes the larger half.
    return int(math.floor(sparsity * size + 0.5))


def magnitude_mask(scores, sparsity):
    """Return a float32 mask zeroing the ``floor(sparsity * n + 0.5)`` lowest scores."""
    scores = np.asarray(scores)
    flat = scores.reshape(-1)
    order = np.argsort(flat, kind="stable")
    mask = np.ones(flat.shape, np.float32)
    mask[order[:_pruned_count(sparsity, flat.size)]] = 0.0
    return mask.reshape(scores.shape)


def column_mask(scores, sparsity):
    """Return a float32 mask zeroing the lowest scores of every column of [in, out]."""
    scores = np.asarray(scores)
    order = np.argsort(scores, axis=0, kind="stable")
    mask = np.ones(scores.shape, np.float32)
    pruned = order[:_pruned_count(sparsity, scores.shape[0])]
    np.put_along_axis(mask, pruned, 0.0, axis=0)
    return mask


def n_m_mask(scores, n, m):
    """Return a float32 mask keeping the n largest of every m consecutive rows per column."""
    scores = np.asarray(scores)
    rows, columns = scores.shape
    if rows % m:
        raise ValueError(
            f"An {n}:{m} pattern needs the kernel's input dimension to be a multiple of {m}; "
            f"received {rows} input rows. Use unstructured sparsity for this layer.")
    groups = scores.reshape(rows // m, m, columns)
    # Stable sort of the negated scores keeps the lower row on ties.
    order = np.argsort(-groups, axis=1, kind="stable")
    mask = np.zeros(groups.shape, np.float32)
    np.put_along_axis(mask, order[:, :n, :], 1.0, axis=1)
    return mask.reshape(rows, columns)


def parse_pattern(pattern):
    """Return (n, m) from an ``"N:M"`` string such as ``"2:4"``."""
    try:
        n, m = (int(part) for part in str(pattern).split(":"))
    except ValueError:
        raise ValueError(
            f"pattern must look like '2:4' (keep N of every M); received {pattern!r}."
        ) from None
    if not 0 < n < m:
        raise ValueError(f"pattern needs 0 < N < M; received {pattern!r}.")
    return n, m


def kernel_sparsity(kernel):
    """Return the fraction of exact zeros in ``kernel``."""
    kernel = np.asarray(kernel)
    return float(np.mean(kernel == 0))


# ---- the transform ----------------------------------------------------------------------------

def _deserialize_schedule(schedule):
    if schedule is None or isinstance(schedule, PruningSchedule):
        return schedule
    if isinstance(schedule, dict) and schedule.get("class_name") in _SCHEDULES:
        return _SCHEDULES[schedule["class_name"]].from_config(schedule["config"])
    raise ValueError(
        "schedule must be a tfmot ConstantSparsity or PolynomialDecay, or its get_config() "
        f"dict; received {schedule!r}.")


@register_transform
class PruningMask(KernelTransform):
    """Multiply the kernel by a float32 mask: ``effective = kernel * mask``.

    Args:
      sparsity: target fraction of zeros, in [0, 1). None with a pattern.
      pattern: ``"N:M"`` to keep N of every M consecutive input weights, or None.
      method: ``"magnitude"`` or ``"activation"`` (Wanda scores, one-shot only).
      schedule: a tfmot ``ConstantSparsity`` / ``PolynomialDecay`` (or its config dict)
        for gradual pruning driven by ``PruningStep``; None for a mask fixed once.

    Variables: ``{kernel}_mask`` [kernel shape] float32, and with a schedule
    ``{kernel}_pruning_step`` int64 (-1 before the first batch, as in tfmot).
    """

    def __init__(self, sparsity=None, pattern=None, method="magnitude", schedule=None):
        super().__init__()
        if sparsity is not None and not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1); received sparsity={sparsity!r}.")
        if pattern is not None:
            parse_pattern(pattern)
        if method not in _PRUNE_METHODS:
            raise ValueError(f"method must be one of {_PRUNE_METHODS}; received {method!r}.")
        self.sparsity = None if sparsity is None else float(sparsity)
        self.pattern = pattern
        self.method = "activation" if method == "wanda" else method
        self.schedule = _deserialize_schedule(schedule)
        if self.schedule is not None and self.method == "activation":
            raise NotImplementedError(
                "Activation-aware pruning is one-shot: it needs calibration inputs that "
                "training does not provide. Use method='magnitude' with a schedule, or "
                "schedule=None for Wanda.")

    def build(self, layer, kernel_name, kernel_shape):
        super().build(layer, kernel_name, kernel_shape)
        self.add_variable(layer, kernel_name, "mask", kernel_shape, initializer="ones")
        if self.schedule is not None:
            self.add_variable(layer, kernel_name, "pruning_step", (), dtype="int64",
                              initializer=keras.initializers.Constant(-1))

    @property
    def mask(self):
        return self.variables["mask"]

    def __call__(self, kernel, training):
        return kernel * self.variables["mask"]

    def strip_value(self, kernel_value):
        return kernel_value * self.variables["mask"].numpy()

    def compute_mask(self, layer, scores, sparsity):
        """Return the mask for ``scores`` of the layer's kernel ``self.kernel_name``."""
        if self.pattern is not None:
            n, m = parse_pattern(self.pattern)
            matrix = layer.kernel_as_matrix(self.kernel_name, scores)
            return layer.matrix_as_kernel(self.kernel_name, n_m_mask(matrix, n, m))
        if self.method == "activation":
            matrix = layer.kernel_as_matrix(self.kernel_name, scores)
            return layer.matrix_as_kernel(self.kernel_name, column_mask(matrix, sparsity))
        return magnitude_mask(scores, sparsity)

    def get_config(self):
        return {
            "sparsity": self.sparsity,
            "pattern": self.pattern,
            "method": self.method,
            "schedule": None if self.schedule is None else self.schedule.get_config(),
        }


def _kernel_before(layer, name, transform):
    """Return the numpy kernel after the transforms that come before ``transform``."""
    kernel = tf.convert_to_tensor(getattr(layer, name))
    for other in layer.transforms[name]:
        if other is transform:
            break
        kernel = other(kernel, False)
    return kernel.numpy()


def _update_mask(layer, name, transform, sparsity, input_norms=None):
    kernel = _kernel_before(layer, name, transform)
    # Masked weights score zero, so a growing sparsity never revives them.
    scores = np.abs(kernel * transform.mask.numpy())
    if input_norms is not None:
        matrix = layer.kernel_as_matrix(name, scores) * input_norms[:, None]
        scores = layer.matrix_as_kernel(name, matrix)
    transform.mask.assign(transform.compute_mask(layer, scores, sparsity))


# ---- the factory -------------------------------------------------------------------------------

def _as_structure_layer(layer, transform):
    """Return a new built CompressedDense / CompressedEinsumDense copy with ``transform``."""
    common = dict(name=layer.name, dtype=layer.dtype_policy,
                  kernel_transforms=[transform])
    items = _dense_config_items(layer)
    if isinstance(layer, keras.layers.Dense):
        new = CompressedDense(layer.units, **items, **common)
        new.build([None, layer.kernel.shape[0]])
    elif isinstance(layer, keras.layers.EinsumDense):
        items.pop("use_bias")
        new = CompressedEinsumDense(layer.equation, layer.partial_output_shape,
                                    bias_axes=layer.bias_axes, **items, **common)
        new.build(einsum_input_shape(layer))
    else:
        raise TypeError(
            "prune accepts keras Dense and EinsumDense layers and tfcompress structure "
            f"layers; received {type(layer).__name__} ({layer.name!r}).")
    new.kernel.assign(layer.kernel.numpy())
    if new.bias is not None:
        new.bias.assign(layer.bias.numpy())
    return new


def _make_schedule(schedule, sparsity, initial_sparsity, begin_step, end_step, frequency):
    if schedule is None or isinstance(schedule, PruningSchedule):
        return schedule
    if schedule == "constant":
        return ConstantSparsity(sparsity, begin_step=begin_step, end_step=end_step,
                                frequency=frequency)
    if schedule == "polynomial":
        return PolynomialDecay(initial_sparsity=initial_sparsity, final_sparsity=sparsity,
                               begin_step=begin_step, end_step=end_step, frequency=frequency)
    raise ValueError(
        "schedule must be None, 'constant', 'polynomial' or a tfmot PruningSchedule; "
        f"received schedule={schedule!r}.")


def _append_mask(layer, transform):
    """Return a new built copy of a KernelLayer with ``transform`` after every kernel's list."""
    config = layer.get_config()
    transforms = config["kernel_transforms"]
    for name in layer.kernel_names:
        # A new mask replaces an earlier one; the earlier mask's values are copied below
        # (same variable name), so its zeros score zero and stay pruned.
        kept = [t for t in transforms[name] if t["class_name"] != "PruningMask"]
        transforms[name] = kept + [serialize_transform(transform)]
    new = type(layer).from_config(config)
    new.build(layer._build_input_shape)
    for name, variable in new._weights_by_name.items():
        if name in layer._weights_by_name:
            variable.assign(layer._weights_by_name[name].numpy())
    if new.input_quantizer is not None:
        new.input_quantizer.set_weights(layer.input_quantizer.get_weights())
    return new


def _input_norms(layer, name, gram):
    """Return the input norms ``||X_i||_2`` seen by kernel ``name``.

    The inputs of the first kernel are the calibration inputs X. The inputs of the second
    factor of a low-rank layer are ``X A``, with A the effective (already pruned) first
    factor, so its norms are the square roots of ``diag(A^T X^T X A)``.
    """
    if name == layer.kernel_names[0]:
        return np.sqrt(np.maximum(np.diag(gram), 0.0))
    if isinstance(layer, (LowRankDense, LowRankEinsumDense)) and name == "kernel_b":
        a = layer.kernel_as_matrix("kernel_a", layer.effective_kernel("kernel_a", False).numpy())
        return np.sqrt(np.maximum(np.einsum("ir,ij,jr->r", a, gram, a), 0.0))
    raise NotImplementedError(
        f"Activation-aware pruning of {type(layer).__name__} kernel {name!r} is not "
        "supported; use method='magnitude'.")


def prune(layer, sparsity=None, pattern=None, method="magnitude", schedule=None,
          begin_step=0, end_step=1000, frequency=100, initial_sparsity=0.0,
          calibration_inputs=None):
    """Return a new built copy of ``layer`` with a ``PruningMask`` on every kernel.

    Args:
      layer: a built keras Dense or EinsumDense (it becomes a ``CompressedDense`` or
        ``CompressedEinsumDense``) or a tfcompress structure layer (its class is kept and
        the mask is appended to each kernel's transforms).
      sparsity: target fraction of zeros in [0, 1). Exactly one of sparsity and pattern.
      pattern: ``"N:M"``, for example ``"2:4"``, along the input dimension.
      method: ``"magnitude"`` or ``"activation"`` (alias ``"wanda"``).
      schedule: None prunes now, once. ``"constant"`` or ``"polynomial"`` (or a tfmot
        PruningSchedule) prune while training with the ``PruningStep`` callback.
      begin_step, end_step, frequency, initial_sparsity: the schedule's arguments, as in
        tfmot (``initial_sparsity`` only for ``"polynomial"``).
      calibration_inputs: the layer's own inputs, needed by ``method="activation"``.

    Returns:
      The pruned layer, named like the source; the source is untouched.
    """
    if (sparsity is None) == (pattern is None):
        raise ValueError(
            "Pass exactly one of sparsity and pattern; received "
            f"sparsity={sparsity!r}, pattern={pattern!r}.")
    if method not in _PRUNE_METHODS:
        raise ValueError(f"method must be one of {_PRUNE_METHODS}; received method={method!r}.")
    if not getattr(layer, "built", False):
        raise ValueError(
            f"Layer {getattr(layer, 'name', layer)!r} must be built before it is pruned.")
    if pattern is not None and schedule is not None:
        raise ValueError(
            f"An N:M pattern is applied once; received pattern={pattern!r} with "
            f"schedule={schedule!r}. Pass schedule=None.")
    schedule = _make_schedule(schedule, sparsity, initial_sparsity, begin_step, end_step,
                              frequency)
    transform = PruningMask(sparsity=sparsity, pattern=pattern, method=method,
                            schedule=schedule)

    gram = None
    if transform.method == "activation":
        if isinstance(layer, FactorizedEmbedding):
            raise NotImplementedError(
                f"Layer {layer.name!r} is an embedding, whose integer ids have no input "
                "norms to weight by; use method='magnitude'.")
        gram, _ = input_gram(layer, calibration_inputs)

    if isinstance(layer, KernelLayer):
        new = _append_mask(layer, transform)
    else:
        new = _as_structure_layer(layer, transform)

    if schedule is None:
        for name in new.kernel_names:
            mask_transform = new.transforms[name][-1]
            norms = None if gram is None else _input_norms(new, name, gram)
            _update_mask(new, name, mask_transform, transform.sparsity, norms)
    return new


# ---- gradual pruning ---------------------------------------------------------------------------

def _scheduled_masks(model):
    for module in [model] + list(model.submodules):
        if not isinstance(module, KernelLayer):
            continue
        for name, transforms in module.transforms.items():
            for transform in transforms:
                if isinstance(transform, PruningMask) and transform.schedule is not None:
                    yield module, name, transform


def has_scheduled_pruning(model):
    """Return True when some layer of ``model`` has a PruningMask with a schedule."""
    return any(True for _ in _scheduled_masks(model))


class PruningStep(keras.callbacks.Callback):
    """Advance the pruning step and update the scheduled masks before each training batch.

    Before every batch, each scheduled ``PruningMask`` increments its ``pruning_step``.
    When ``schedule(step)`` returns should_prune, the mask becomes the magnitude mask of
    the masked kernel at the scheduled sparsity. Masks change between batches, outside the
    compiled train step, so the step itself stays a plain graph.
    """

    def on_train_begin(self, logs=None):
        self._masks = list(_scheduled_masks(self.model))
        if not self._masks:
            logger.warning("PruningStep: the model has no scheduled PruningMask; it does "
                           "nothing.")

    def on_train_batch_begin(self, batch, logs=None):
        for layer, name, transform in self._masks:
            step = transform.variables["pruning_step"]
            step.assign_add(1)
            should_prune, sparsity = transform.schedule(step.value())
            if bool(should_prune):
                _update_mask(layer, name, transform, float(sparsity))
