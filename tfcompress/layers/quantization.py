"""Quantization-aware training (int8), binary and ternary weights, and ``quantize()``.

Pieces, each usable on its own:

- ``FakeQuant``: a kernel transform that rounds the kernel to ``bits``-bit levels in the
  forward pass with ``tf.quantization.fake_quant_with_min_max_vars`` (or its per-channel
  variant) and passes gradients straight through. The range is symmetric,
  ``[-max|W|, max|W|]`` with narrow range (levels -127..127 for 8 bits), taken from the
  current kernel, so it follows the weights during training without extra state.
- ``ActivationQuantizer``: a Keras layer that fake-quantizes activations with one
  per-tensor range, learned as an exponential moving average of the batch min and max
  while training and fixed at inference. ``calibrate()`` sets it from data instead.
- ``BinaryWeights`` / ``TernaryWeights``: kernel transforms that replace W by
  ``sign(W) * alpha`` or ``{-alpha, 0, alpha}`` per output channel (Ternary Weight
  Networks, Li et al., 2016), trained with a straight-through estimator.
- ``QuantizedAttentionCore``: the encoder's attention core with activation quantizers on
  the inputs of both attention matmuls (Q and K, then the probabilities and V).
- ``quantize(layer, mode, bits, calibration_inputs)``: the factory the model surgery
  calls, one layer at a time.

What this adds to tfmot: tfmot's ``quantize_model`` rejects models with custom layers
or TFOpLambda residuals such as a BERT encoder, while these pieces go on any structure
layer of ``tfcompress.layers`` and compose with pruning masks and low-rank factors.

The TFLite converter (TensorFlow 2.21, ``optimizations=[tf.lite.Optimize.DEFAULT]``)
turns a fake-quantized matmul into an int8 FULLY_CONNECTED when its input, its kernel and
its output all carry a range. The output range comes from the next fake quant (an
``ActivationQuantizer`` further down) or from a representative dataset. Per-channel
fake quant of a Dense kernel does not convert: the converter stops with "'tfl.transpose'
op has mismatched quantized axes of input and output", because FULLY_CONNECTED stores the
kernel transposed. ``quantize()`` therefore uses per-tensor weight ranges, as tfmot does
for Dense layers.
"""

import contextlib
import logging
import math
import warnings

import numpy as np

from tfcompress._keras import keras, tf
from tfcompress.bert.layers import AttentionCore, mask_scores
from tfcompress.layers.base import (
    CompressedDense,
    CompressedEinsumDense,
    KernelLayer,
    KernelTransform,
    LowRankDense,
    LowRankEinsumDense,
    register_transform,
    serialize_transform,
)
from tfcompress.layers.weight_only import (
    WEIGHT_ONLY_BITS,
    WeightOnlyQuantDense,
    WeightOnlyQuantEmbedding,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FakeQuant",
    "BinaryWeights",
    "TernaryWeights",
    "ActivationQuantizer",
    "QuantizedAttentionCore",
    "QUANTIZE_MODES",
    "quantize",
    "calibrate",
    "quantization_notes",
]

QUANTIZE_MODES = ("qat", "weight_only", "binary", "ternary")
QAT_BITS = (8,)

# Smallest half-width of a fake-quant range: an all-zero channel (a pruned column, say)
# would otherwise give max == min == 0 and a zero quantization step.
_MIN_RANGE = 1e-8


def _check_bool(value, argument):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{argument} must be True or False; received {value!r}.")
    return bool(value)


def _check_fake_quant_bits(bits):
    # tf.quantization.fake_quant_* accepts 2 to 16 bits; above 8 there is no integer
    # kernel to convert to, so the transforms stop at 8.
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [2, 8]; received bits={bits!r}.")
    return int(bits)


def _check_axis(axis):
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an integer; received {axis!r}.")
    return int(axis)


def _channel_last(kernel, axis):
    """Move ``axis`` of ``kernel`` to the end; returns the tensor and the inverse permutation."""
    rank = kernel.shape.rank
    axis = axis % rank
    if axis == rank - 1:
        return kernel, None
    permutation = [i for i in range(rank) if i != axis] + [axis]
    return tf.transpose(kernel, permutation), np.argsort(permutation).tolist()


def _fake_quantize(x, range_min, range_max, bits, narrow_range):
    """Per-tensor fake quant of a float32 tensor (gradient: straight through inside the range)."""
    range_max = tf.maximum(range_max, range_min + _MIN_RANGE)
    return tf.quantization.fake_quant_with_min_max_vars(
        x, range_min, range_max, num_bits=bits, narrow_range=narrow_range)


# ---- weight transforms -------------------------------------------------------------------

@register_transform
class FakeQuant(KernelTransform):
    """Fake-quantize a kernel to ``bits`` bits, with ranges taken from the kernel itself.

    Symmetric (the default): per channel c, ``m_c = max_i |W[i, c]|`` and the kernel is
    rounded to the 2^bits - 1 levels of ``[-m_c, m_c]`` (narrow range, so 0 is a level and
    the TFLite int8 weight zero point is 0). Asymmetric: the range is
    ``[min(W, 0), max(W, 0)]`` with 2^bits levels. The range gets no gradient; the kernel
    gets the straight-through gradient of the fake-quant op.

    The inference layer keeps this transform (``strip()`` returns a copy): the TFLite
    converter needs the fake-quant op to emit an int8 kernel. It has no variables.

    Args:
      bits: bits per weight, 2 to 8. Defaults to 8.
      per_channel: one range per index of ``axis`` instead of one per kernel. Defaults
        to True. Per-channel Dense kernels do not convert to TFLite (see the module
        docstring); ``quantize()`` passes False.
      symmetric: symmetric narrow range if True, else min/max range. TFLite int8 kernels
        need symmetric weights. Defaults to True.
      axis: the output-channel axis of the kernel. Defaults to -1.
    """

    def __init__(self, bits=8, per_channel=True, symmetric=True, axis=-1):
        super().__init__()
        self.bits = _check_fake_quant_bits(bits)
        self.per_channel = _check_bool(per_channel, "per_channel")
        self.symmetric = _check_bool(symmetric, "symmetric")
        self.axis = _check_axis(axis)

    def build(self, layer, kernel_name, kernel_shape):
        super().build(layer, kernel_name, kernel_shape)
        _check_axis_in_kernel(self.axis, layer, kernel_name, kernel_shape)

    def __call__(self, kernel, training):
        if not self.per_channel:
            low, high = self._range(kernel, axes=None)
            return _fake_quantize(kernel, low, high, self.bits, self.symmetric)

        moved, inverse = _channel_last(kernel, self.axis)
        low, high = self._range(moved, axes=list(range(moved.shape.rank - 1)))
        high = tf.maximum(high, low + _MIN_RANGE)
        quantized = tf.quantization.fake_quant_with_min_max_vars_per_channel(
            moved, low, high, num_bits=self.bits, narrow_range=self.symmetric)
        return quantized if inverse is None else tf.transpose(quantized, inverse)

    def _range(self, kernel, axes):
        kernel = tf.stop_gradient(kernel)
        if self.symmetric:
            high = tf.maximum(tf.reduce_max(tf.abs(kernel), axis=axes), _MIN_RANGE)
            return -high, high
        low = tf.minimum(tf.reduce_min(kernel, axis=axes), 0.0)
        high = tf.maximum(tf.reduce_max(kernel, axis=axes), 0.0)
        return low, high

    def strip(self):
        return FakeQuant(**self.get_config())

    def get_config(self):
        return {"bits": self.bits, "per_channel": self.per_channel,
                "symmetric": self.symmetric, "axis": self.axis}


def _check_axis_in_kernel(axis, layer, kernel_name, kernel_shape):
    if not -len(kernel_shape) <= axis < len(kernel_shape):
        raise ValueError(
            f"axis={axis} is out of range for the {len(kernel_shape)}-D kernel "
            f"{kernel_name!r} of shape {list(kernel_shape)} in layer {layer.name!r}.")


def _straight_through(kernel, quantized):
    """Forward ``quantized``, backward the identity to ``kernel`` (straight-through estimator)."""
    return kernel + tf.stop_gradient(quantized - kernel)


class _ChannelScaledWeights(KernelTransform):
    """Shared part of binary and ternary weights: per-channel levels, STE, folding on strip."""

    def __init__(self, axis=-1):
        super().__init__()
        self.axis = _check_axis(axis)

    def build(self, layer, kernel_name, kernel_shape):
        super().build(layer, kernel_name, kernel_shape)
        _check_axis_in_kernel(self.axis, layer, kernel_name, kernel_shape)

    def _reduce_axes(self, rank):
        axis = self.axis % rank
        return [i for i in range(rank) if i != axis]

    def quantized_value(self, kernel):
        """Return the quantized kernel (float32 tensor of the kernel's shape)."""
        raise NotImplementedError

    def __call__(self, kernel, training):
        return _straight_through(kernel, self.quantized_value(kernel))

    def strip_value(self, kernel_value):
        return self.quantized_value(tf.constant(kernel_value, tf.float32)).numpy()

    def get_config(self):
        return {"axis": self.axis}


@register_transform
class BinaryWeights(_ChannelScaledWeights):
    """Binarize a kernel per output channel: ``W_b = sign(W) * mean_i |W[i, c]|``.

    ``sign(0)`` counts as +1, so every weight is one of two values per channel. The
    scale minimizes ``||W - alpha * sign(W)||`` per channel (XNOR-Net, Rastegari et al.,
    2016). Training uses the straight-through estimator: the gradient with respect to W
    is the gradient with respect to ``W_b``. ``strip()`` folds ``W_b`` into the kernel.

    Args:
      axis: the output-channel axis of the kernel. Defaults to -1.
    """

    def quantized_value(self, kernel):
        axes = self._reduce_axes(kernel.shape.rank)
        alpha = tf.reduce_mean(tf.abs(kernel), axis=axes, keepdims=True)
        return tf.where(kernel >= 0, alpha, -alpha)


@register_transform
class TernaryWeights(_ChannelScaledWeights):
    """Ternarize a kernel per output channel to ``{-alpha_c, 0, alpha_c}``.

    With ``delta_c = threshold * mean_i |W[i, c]|``, weights with ``|W| <= delta_c`` become
    0 and the others ``sign(W) * alpha_c``. ``alpha_c`` is the mean of ``|W|`` over the kept
    weights of the channel. Ternary Weight Networks (Li et al., 2016) use threshold 0.7.
    Trained with the straight-through estimator; ``strip()`` folds the values into the
    kernel.

    Args:
      threshold: t in ``delta = t * mean |W|``, a positive number. Defaults to 0.7.
      axis: the output-channel axis of the kernel. Defaults to -1.
    """

    def __init__(self, threshold=0.7, axis=-1):
        super().__init__(axis=axis)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
                threshold > 0 and math.isfinite(threshold)):
            raise ValueError(
                f"threshold must be a positive finite number (0.7 is usual); received "
                f"threshold={threshold!r}.")
        self.threshold = float(threshold)

    def quantized_value(self, kernel):
        axes = self._reduce_axes(kernel.shape.rank)
        magnitude = tf.abs(kernel)
        delta = self.threshold * tf.reduce_mean(magnitude, axis=axes, keepdims=True)
        kept = tf.cast(magnitude > delta, kernel.dtype)
        # max(count, 1) keeps a channel with no weight above delta at alpha = 0, not NaN.
        count = tf.maximum(tf.reduce_sum(kept, axis=axes, keepdims=True), 1.0)
        alpha = tf.reduce_sum(magnitude * kept, axis=axes, keepdims=True) / count
        return tf.sign(kernel) * kept * alpha

    def get_config(self):
        return {"threshold": self.threshold, "axis": self.axis}


# ---- activation quantizer ----------------------------------------------------------------

def _smart_cond(condition, true_fn, false_fn):
    if isinstance(condition, (bool, int, np.bool_, np.integer)):
        return true_fn() if condition else false_fn()
    return tf.cond(tf.cast(condition, tf.bool), true_fn, false_fn)


@keras.utils.register_keras_serializable(package="tfcompress")
class ActivationQuantizer(keras.layers.Layer):
    """Fake-quantize activations to ``bits`` bits with one learned per-tensor range.

    While training, each batch updates the range by an exponential moving average,
    ``min <- momentum * min + (1 - momentum) * min(batch, 0)``, and the same for max. The
    first update takes the batch values as they are. At inference the stored range is
    used. The range always contains 0, which TFLite needs to represent zero padding
    exactly. ``calibrate()`` sets the range to the min and max seen over calibration
    batches instead. Until a range has been set, the layer passes inputs through
    unchanged.

    ``strip()`` returns the inference form: the same range, fixed, without the update
    counter (``learn_range=False``).

    Args:
      bits: bits per activation, 2 to 8. Defaults to 8.
      momentum: EMA momentum of the range, in [0, 1). Defaults to 0.99.
      learn_range: update the range while training. False fixes it to
        ``initial_range``. Defaults to True.
      initial_range: ``[min, max]`` to start from, required when learn_range is False.
        Defaults to None (no range yet).

    Input and output: any float tensor, same shape and dtype.
    """

    def __init__(self, bits=8, momentum=0.99, learn_range=True, initial_range=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.bits = _check_fake_quant_bits(bits)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (
                0.0 <= momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1); received momentum={momentum!r}.")
        self.momentum = float(momentum)
        self.learn_range = _check_bool(learn_range, "learn_range")
        if initial_range is not None:
            values = list(initial_range) if isinstance(initial_range, (list, tuple)) else None
            if values is None or len(values) != 2 or not values[0] <= 0.0 <= values[1]:
                raise ValueError(
                    "initial_range must be [min, max] with min <= 0 <= max; received "
                    f"initial_range={initial_range!r}.")
            initial_range = (float(values[0]), float(values[1]))
        elif not self.learn_range:
            raise ValueError(
                "An ActivationQuantizer with learn_range=False needs initial_range=[min, "
                "max]; received initial_range=None.")
        self.initial_range = initial_range
        self._calibrating = False
        # The state is three scalars whatever the input shape, so it is created here. A
        # layer rebuilt from its config then contains its range before the first call.
        self.build(None)

    def build(self, input_shape):
        if self.built:
            return
        low, high = self.initial_range or (0.0, 0.0)
        self.range_min = self.add_weight(
            name="range_min", shape=[], dtype=tf.float32, trainable=False,
            initializer=keras.initializers.Constant(low), experimental_autocast=False)
        self.range_max = self.add_weight(
            name="range_max", shape=[], dtype=tf.float32, trainable=False,
            initializer=keras.initializers.Constant(high), experimental_autocast=False)
        self.range_updates = None
        if self.learn_range:
            # Training-only state: how many batches have set the range (0 = no range yet).
            self.range_updates = self.add_weight(
                name="range_updates", shape=[], dtype=tf.int64, trainable=False,
                initializer=keras.initializers.Constant(1 if self.initial_range else 0))
        super().build(input_shape)

    def call(self, inputs, training=None):
        x = tf.cast(inputs, tf.float32)
        if self._calibrating and self.learn_range:
            self._observe(x)
        if not self.learn_range:
            outputs = self._quantize(x, self.range_min, self.range_max)
        else:
            if training is None:
                training = keras.backend.learning_phase()
            outputs = _smart_cond(training, lambda: self._train(x), lambda: self._infer(x))
        return tf.cast(outputs, inputs.dtype)

    def _quantize(self, x, low, high):
        return _fake_quantize(x, low, high, self.bits, narrow_range=False)

    def _batch_range(self, x):
        x = tf.stop_gradient(x)
        return tf.minimum(tf.reduce_min(x), 0.0), tf.maximum(tf.reduce_max(x), 0.0)

    def _train(self, x):
        low, high = self._batch_range(x)
        first = tf.equal(self.range_updates, 0)
        m = self.momentum
        low = tf.where(first, low, m * self.range_min + (1.0 - m) * low)
        high = tf.where(first, high, m * self.range_max + (1.0 - m) * high)
        updates = [self.range_min.assign(low), self.range_max.assign(high),
                   self.range_updates.assign_add(1)]
        with tf.control_dependencies(updates):
            return self._quantize(x, tf.identity(low), tf.identity(high))

    def _infer(self, x):
        has_range = self.range_updates > 0
        return tf.where(has_range, self._quantize(x, self.range_min, self.range_max), x)

    def _observe(self, x):
        """Widen the range to cover ``x`` (calibration: running min and max, no averaging)."""
        low, high = self._batch_range(x)
        if int(self.range_updates.numpy()) > 0:
            low = tf.minimum(low, self.range_min)
            high = tf.maximum(high, self.range_max)
        self.range_min.assign(low)
        self.range_max.assign(high)
        self.range_updates.assign_add(1)

    @property
    def has_range(self):
        """Whether a range has been set (by training, calibration or initial_range)."""
        return self.range_updates is None or int(self.range_updates.numpy()) > 0

    def current_range(self):
        """Return the range ``(min, max)`` as Python floats."""
        return float(self.range_min.numpy()), float(self.range_max.numpy())

    def strip(self):
        """Return the fixed-range inference quantizer, or None when no range was ever set."""
        if not self.has_range:
            warnings.warn(
                f"ActivationQuantizer {self.name!r} never saw data (no calibration or "
                "training step), so the inference layer has no input fake quant there. "
                "Run tfcompress.layers.calibrate(model, data) before strip.",
                stacklevel=2)
            return None
        config = self.get_config()
        config.update(learn_range=False, initial_range=list(self.current_range()))
        return type(self).from_config(config)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(bits=self.bits, momentum=self.momentum, learn_range=self.learn_range,
                      initial_range=None if self.initial_range is None
                      else list(self.initial_range))
        return config


# ---- attention --------------------------------------------------------------------------

_ATTENTION_QUANTIZERS = ("query", "key", "probs", "value")


@keras.utils.register_keras_serializable(package="tfcompress")
class QuantizedAttentionCore(AttentionCore):
    """``AttentionCore`` with int8 fake quant on the inputs of both attention matmuls.

    ``scores = q(Q) q(K)^T / sqrt(d) + mask bias``, ``P = softmax(scores)`` and
    ``context = q(P) q(V)``, where each ``q`` is its own ``ActivationQuantizer`` (per-tensor
    range). After TFLite conversion both BATCH_MATMULs take int8 inputs. Scaling, masking
    and the softmax stay float32 unless ``quantize_softmax=True``, which also quantizes
    the scores, so that the converter can emit an int8 SOFTMAX.

    Args:
      num_heads, head_size, dropout_rate: as ``AttentionCore``.
      bits: activation bits. Defaults to 8.
      momentum: EMA momentum of the ranges. Defaults to 0.99.
      quantize_softmax: also fake-quantize the softmax input. Defaults to False.
      quantizers: ``{name: ActivationQuantizer or its serialized dict}`` for the names
        query, key, probs, value (and scores with quantize_softmax), to restore learned
        ranges; missing names get new quantizers. Defaults to None.

    Call arguments and output: as ``AttentionCore``.
    """

    def __init__(self, num_heads, head_size, dropout_rate=0.0, bits=8, momentum=0.99,
                 quantize_softmax=False, quantizers=None, **kwargs):
        super().__init__(num_heads, head_size, dropout_rate, **kwargs)
        self.bits = _check_fake_quant_bits(bits)
        self.momentum = momentum
        self.quantize_softmax = _check_bool(quantize_softmax, "quantize_softmax")
        names = _ATTENTION_QUANTIZERS + (("scores",) if self.quantize_softmax else ())
        quantizers = dict(quantizers or {})
        unknown = sorted(set(quantizers) - set(names))
        if unknown:
            raise ValueError(
                f"quantizers has unknown names {unknown}; the names are {list(names)}.")
        self.quantizers = {}
        for name in names:
            quantizer = quantizers.get(name)
            if isinstance(quantizer, dict):
                quantizer = keras.layers.deserialize(quantizer)
            if quantizer is None:
                quantizer = ActivationQuantizer(bits=self.bits, momentum=momentum,
                                                name=f"{name}_quantizer",
                                                dtype=self.dtype_policy)
            if not isinstance(quantizer, ActivationQuantizer):
                raise TypeError(
                    f"quantizers[{name!r}] must be an ActivationQuantizer or its serialized "
                    f"dict; received {type(quantizer).__name__}.")
            self.quantizers[name] = quantizer

    def call(self, inputs, training=None):
        query, key, value, mask = inputs
        query = self.quantizers["query"](query, training=training)
        key = self.quantizers["key"](key, training=training)
        value = self.quantizers["value"](value, training=training)

        q = self._split_heads(query)
        k = self._split_heads(key)
        scores = tf.matmul(q, k, transpose_b=True)
        # Scores and softmax in float32 whatever the compute dtype, as in AttentionCore.
        scores = tf.cast(scores, tf.float32) * (1.0 / math.sqrt(self.head_size))
        scores = mask_scores(scores, mask)
        if self.quantize_softmax:
            scores = self.quantizers["scores"](scores, training=training)
        probs = tf.nn.softmax(scores, axis=-1)
        probs = self._dropout(probs, training=training)
        probs = self.quantizers["probs"](probs, training=training)

        v = self._split_heads(value)
        context = tf.matmul(tf.cast(probs, v.dtype), v)
        context = tf.transpose(context, [0, 2, 1, 3])
        batch, seq = tf.shape(context)[0], tf.shape(context)[1]
        return tf.reshape(context, [batch, seq, self.num_heads * self.head_size])

    def fold_quantization(self):
        """Return a plain ``AttentionCore`` with the same heads: no fake quantization."""
        core = AttentionCore(self.num_heads, self.head_size, self.dropout_rate,
                             name=self.name, dtype=self.dtype_policy)
        return core

    def strip(self):
        """Return the inference core: the same ranges, fixed, without update counters."""
        config = self.get_config()
        quantizers = {}
        for name, quantizer in self.quantizers.items():
            stripped = quantizer.strip()
            if stripped is None:
                # Keep the learning quantizer so that the core can still be calibrated.
                # It passes inputs through until then, and strip() has warned.
                stripped = quantizer
            quantizers[name] = keras.layers.serialize(stripped)
        config["quantizers"] = quantizers
        return type(self).from_config(config)

    def get_config(self):
        config = super().get_config()
        config.update(bits=self.bits, momentum=self.momentum,
                      quantize_softmax=self.quantize_softmax,
                      quantizers={name: keras.layers.serialize(q)
                                  for name, q in self.quantizers.items()})
        return config


# ---- calibration ------------------------------------------------------------------------

def _learning_quantizers(model_or_layer):
    found = [m for m in model_or_layer.submodules if isinstance(m, ActivationQuantizer)]
    if isinstance(model_or_layer, ActivationQuantizer):
        found.append(model_or_layer)
    unique = {id(q): q for q in found if q.learn_range}
    return list(unique.values())


@contextlib.contextmanager
def _calibrating(quantizers):
    for quantizer in quantizers:
        quantizer._calibrating = True
    try:
        yield
    finally:
        for quantizer in quantizers:
            quantizer._calibrating = False


def _batches(data):
    if isinstance(data, tf.data.Dataset):
        for batch in data:
            if isinstance(batch, tuple) and len(batch) in (2, 3):
                batch = batch[0]  # (inputs, labels[, weights])
            yield batch
    else:
        yield data


def calibrate(model, data, max_batches=None):
    """Set the learned range of every ``ActivationQuantizer`` in ``model`` from data.

    Runs ``model`` eagerly at inference (no dropout) on each batch and sets each range to
    the min and max its quantizer saw over all batches, widening ranges already set.
    Training afterwards continues from these ranges with the moving average.

    Args:
      model: a Keras model or layer containing activation quantizers.
      data: one batch of model inputs (array, dict or list), or a ``tf.data.Dataset`` of
        batches or of ``(inputs, labels)`` pairs.
      max_batches: stop after this many batches. Defaults to None (all).

    Returns:
      The number of quantizers calibrated.
    """
    if max_batches is not None and (
            isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive integer; received {max_batches!r}.")
    quantizers = _learning_quantizers(model)
    if not quantizers:
        raise ValueError(
            f"{getattr(model, 'name', model)!r} contains no ActivationQuantizer with a "
            "learned range (stripped quantizers have fixed ranges). Quantize it with "
            "tfcompress.layers.quantize(layer, mode='qat') and calibrate before strip.")
    with _calibrating(quantizers):
        seen = 0
        for batch in _batches(data):
            model(batch, training=False)
            seen += 1
            if max_batches is not None and seen >= max_batches:
                break
    if seen == 0:
        raise ValueError("data yielded no batch; pass at least one batch of inputs.")
    missing = [q.name for q in quantizers if not q.has_range]
    if missing:
        warnings.warn(
            f"{len(missing)} activation quantizers saw no data during calibration "
            f"({missing[:5]}); they pass inputs through until training sets a range.",
            stacklevel=2)
    logger.info("Calibrated %d activation quantizers on %d batches.", len(quantizers), seen)
    return len(quantizers)


# ---- quantize() ---------------------------------------------------------------------------

_QUANTIZATION_TRANSFORMS = (FakeQuant, BinaryWeights, TernaryWeights)


def _check_bits_for_mode(mode, bits):
    if mode == "qat":
        bits = 8 if bits is None else bits
        if bits not in QAT_BITS or isinstance(bits, bool):
            raise ValueError(
                f"mode='qat' supports bits in {list(QAT_BITS)} (int8 TFLite kernels); "
                f"received bits={bits!r}. For 4-bit weights use mode='weight_only'.")
    elif mode == "weight_only":
        bits = 8 if bits is None else bits
        if bits not in WEIGHT_ONLY_BITS or isinstance(bits, bool):
            raise ValueError(
                f"mode='weight_only' supports bits in {list(WEIGHT_ONLY_BITS)}; received "
                f"bits={bits!r}.")
    elif bits is not None:
        raise ValueError(
            f"mode={mode!r} fixes the number of levels, so bits must be None; received "
            f"bits={bits!r}.")
    return bits


def _build_input_shape(layer, kernel_rows):
    shape = getattr(layer, "_build_input_shape", None)
    if shape is None:
        return tf.TensorShape([None, kernel_rows])
    return shape


def _to_structure_layer(layer):
    """Return ``(class, config, {weight name: value}, input shape)`` of a Dense-like layer."""
    if isinstance(layer, KernelLayer):
        values = {name: v.numpy() for name, v in layer._weights_by_name.items()}
        return type(layer), layer.get_config(), values, layer._build_input_shape

    config = layer.get_config()
    config.pop("activity_regularizer", None)
    values = {"kernel": layer.kernel.numpy()}
    if getattr(layer, "bias", None) is not None:
        values["bias"] = layer.bias.numpy()
    if isinstance(layer, keras.layers.EinsumDense):
        config["output_shape"] = list(layer.partial_output_shape)
        return (CompressedEinsumDense, config, values,
                _build_input_shape(layer, layer.kernel.shape[0]))
    return CompressedDense, config, values, _build_input_shape(layer, layer.kernel.shape[0])


def _with_transform(layer, transform, input_quantizer):
    cls, config, values, input_shape = _to_structure_layer(layer)
    existing = config.get("kernel_transforms") or {}
    for name, transforms in existing.items():
        for entry in transforms:
            if entry["class_name"] in {t.__name__ for t in _QUANTIZATION_TRANSFORMS}:
                raise ValueError(
                    f"Layer {layer.name!r} is already quantized ({entry['class_name']} on "
                    f"{name!r}); quantize a layer once.")
    config["kernel_transforms"] = {
        name: list(existing.get(name, [])) + [serialize_transform(transform)]
        for name in cls.kernel_names}
    if input_quantizer is not None:
        config["input_quantizer"] = keras.layers.serialize(input_quantizer)

    new = cls.from_config(config)
    new.build(input_shape)
    for name, variable in new._weights_by_name.items():
        if name in values:
            variable.assign(values[name])
    return new


def _check_transform_axis(layer):
    """Output-channel axis for binary/ternary on ``layer``'s kernels, or raise."""
    if isinstance(layer, (keras.layers.EinsumDense, CompressedEinsumDense, LowRankEinsumDense)):
        raise NotImplementedError(
            f"Binary and ternary weights need a per-output-channel axis, which the einsum "
            f"kernel of {layer.name!r} does not have in one place. Use mode='qat' on it, "
            "or build the projection as a Dense layer.")
    return -1


def _weight_only(layer, bits):
    if isinstance(layer, keras.layers.Embedding):
        return WeightOnlyQuantEmbedding.from_float(layer, bits=bits)
    if isinstance(layer, keras.layers.Dense):
        return WeightOnlyQuantDense.from_float(layer, bits=bits)
    if isinstance(layer, CompressedDense):
        if layer.input_quantizer is not None:
            warnings.warn(
                f"Layer {layer.name!r} has an input quantizer, which weight-only "
                "quantization drops: weight-only layers take float inputs.", stacklevel=3)
        # Masks, binary or fake-quant transforms are applied before storage.
        kernel = layer.effective_kernel("kernel", training=False).numpy()
        return WeightOnlyQuantDense.from_float(layer, bits=bits, kernel=kernel)
    raise NotImplementedError(
        f"mode='weight_only' supports Dense, CompressedDense and Embedding layers; "
        f"{layer.name!r} is a {type(layer).__name__}. For low-rank or einsum layers use "
        "mode='qat', or export to TFLite with int4/int8 weights.")


def quantize(layer, mode="qat", bits=None, calibration_inputs=None, *, per_channel=False,
             threshold=0.7, quantize_softmax=False, momentum=0.99):
    """Return a new built, quantized copy of a built ``layer`` (the source is unchanged).

    Modes:
      - ``"qat"``: int8 quantization-aware training. Dense-like layers get a ``FakeQuant``
        on every kernel, after existing transforms such as a pruning mask, and an
        ``ActivationQuantizer`` on their inputs. Keras Dense / EinsumDense become
        ``CompressedDense`` / ``CompressedEinsumDense``. An ``AttentionCore`` becomes a
        ``QuantizedAttentionCore``.
      - ``"weight_only"``: int8 or int4 storage, ``WeightOnlyQuantDense`` /
        ``WeightOnlyQuantEmbedding``.
      - ``"binary"`` / ``"ternary"``: ``BinaryWeights`` / ``TernaryWeights`` on every kernel.

    A ``LayerNormalization`` comes back unchanged in every mode: it stays float32 (see
    ``quantization_notes``).

    Args:
      layer: built keras Dense, EinsumDense or Embedding, a tfcompress structure layer
        (CompressedDense, LowRankDense, CompressedEinsumDense, LowRankEinsumDense), an
        ``AttentionCore`` or a LayerNormalization.
      mode: one of ``QUANTIZE_MODES``. Defaults to "qat".
      bits: 8 for qat; 8 or 4 for weight_only; None for binary and ternary. Defaults to
        None, which means 8 where bits apply.
      calibration_inputs: inputs of ``layer`` (for an attention core the list
        ``[query, key, value, mask]``) used to set the activation ranges of a qat layer.
        Defaults to None (ranges are learned while training, or set by ``calibrate``).
      per_channel: per-output-channel weight ranges for qat. Defaults to False because
        per-channel Dense kernels do not convert to TFLite (module docstring).
      threshold: ternary threshold t. Defaults to 0.7.
      quantize_softmax: for an attention core, quantize the softmax input too. Defaults
        to False.
      momentum: EMA momentum of learned activation ranges. Defaults to 0.99.

    Returns:
      The new layer, named like ``layer``.
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"mode must be one of {list(QUANTIZE_MODES)}; received mode={mode!r}.")
    bits = _check_bits_for_mode(mode, bits)
    if not isinstance(layer, keras.layers.Layer):
        raise TypeError(f"layer must be a tf_keras Layer; received {type(layer).__name__}.")

    if isinstance(layer, keras.layers.LayerNormalization):
        logger.info("Layer %s: %s.", layer.name, quantization_notes(layer))
        return layer
    if not layer.built:
        raise ValueError(
            f"Layer {layer.name!r} must be built (called once, or loaded with weights) "
            "before quantize(), which copies its weights.")

    if isinstance(layer, AttentionCore):
        if isinstance(layer, QuantizedAttentionCore):
            raise ValueError(f"Attention core {layer.name!r} is already quantized.")
        if mode != "qat":
            raise ValueError(
                f"An AttentionCore has no weights, so only mode='qat' applies to "
                f"{layer.name!r}; received mode={mode!r}.")
        config = layer.get_config()
        core = QuantizedAttentionCore(bits=bits, momentum=momentum,
                                      quantize_softmax=quantize_softmax, **config)
        if calibration_inputs is not None:
            calibrate(core, calibration_inputs)
        return core

    if mode == "weight_only":
        return _weight_only(layer, bits)

    supported = (keras.layers.Dense, keras.layers.EinsumDense, CompressedDense, LowRankDense,
                 CompressedEinsumDense, LowRankEinsumDense)
    if not isinstance(layer, supported):
        raise TypeError(
            f"quantize(mode={mode!r}) supports Dense, EinsumDense, CompressedDense, "
            "LowRankDense, CompressedEinsumDense, LowRankEinsumDense, AttentionCore and "
            f"LayerNormalization; {layer.name!r} is a {type(layer).__name__}.")

    if mode == "qat":
        transform = FakeQuant(bits=bits, per_channel=per_channel)
        quantizer = ActivationQuantizer(bits=bits, momentum=momentum, name="input_quantizer",
                                        dtype=layer.dtype_policy)
        new = _with_transform(layer, transform, quantizer)
        if calibration_inputs is not None:
            calibrate(new, calibration_inputs)
        return new

    axis = _check_transform_axis(layer)
    transform = (BinaryWeights(axis=axis) if mode == "binary"
                 else TernaryWeights(threshold=threshold, axis=axis))
    return _with_transform(layer, transform, None)


def quantization_notes(layer):
    """Return one line on how ``layer`` is quantized, or None for layers without a note.

    Used by the compression report, for example "kept in float32 (LayerNormalization)".
    """
    if isinstance(layer, keras.layers.LayerNormalization):
        return "kept in float32 (LayerNormalization)"
    if isinstance(layer, QuantizedAttentionCore):
        softmax = "int8 softmax input" if layer.quantize_softmax else "softmax in float32"
        return f"int{layer.bits} inputs to both attention matmuls; {softmax}"
    if isinstance(layer, AttentionCore):
        return "kept in float32 (attention core not quantized)"
    if isinstance(layer, WeightOnlyQuantDense | WeightOnlyQuantEmbedding):
        return f"int{layer.bits} weights stored, float compute (weight-only)"
    if isinstance(layer, KernelLayer):
        notes = []
        for name, transforms in layer.transforms.items():
            for transform in transforms:
                if isinstance(transform, FakeQuant):
                    ranges = "per-channel" if transform.per_channel else "per-tensor"
                    notes.append(f"{name}: int{transform.bits} {ranges} fake quant")
                elif isinstance(transform, BinaryWeights):
                    notes.append(f"{name}: binary")
                elif isinstance(transform, TernaryWeights):
                    notes.append(f"{name}: ternary (threshold {transform.threshold})")
        if isinstance(layer.input_quantizer, ActivationQuantizer):
            notes.append(f"inputs: int{layer.input_quantizer.bits} per-tensor fake quant")
        return "; ".join(notes) or None
    return None
