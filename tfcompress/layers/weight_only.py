"""Weight-only quantized layers: int8 or packed int4 kernels dequantized in ``call()``.

The kernel is stored as a real ``tf.int8`` variable, so the model stores about a quarter
(int8) or an eighth (int4) of the float32 bytes in TensorFlow as well as on disk. Inputs
and activations stay in floating point; this saves memory, not compute.

Quantization is symmetric with one float32 scale per output channel (per column of a
Dense kernel, per row of an embedding table):

    s_c = max_i |W[i, c]| / q_max,    Q[i, c] = clip(round(W[i, c] / s_c), -q_max, q_max)

with q_max = 127 for bits=8 and 7 for bits=4, so the dequantized kernel ``s_c * Q[i, c]``
is within ``s_c / 2`` of W elementwise. For bits=4, two values share one int8 byte along
the packed axis (input rows of a Dense kernel, embedding columns of a table): the even
index in the low nibble, the odd index in the high nibble, both two's complement.

What this adds to Keras and the TFLite converter: TensorFlow-side int8/int4 storage of a
trained float layer, for running or fine-tuning the rest of a model in less memory. For
int4 *TFLite* files, the export module uses ai-edge-quantizer on the float model instead.
"""

import logging

import numpy as np

from tfcompress._keras import keras, tf

logger = logging.getLogger(__name__)

__all__ = [
    "WeightOnlyQuantDense",
    "WeightOnlyQuantEmbedding",
    "quantize_symmetric",
    "pack_int4",
    "unpack_int4",
]

WEIGHT_ONLY_BITS = (4, 8)


def _check_bits(bits):
    if isinstance(bits, bool) or bits not in WEIGHT_ONLY_BITS:
        raise ValueError(
            f"bits must be one of {list(WEIGHT_ONLY_BITS)} for weight-only quantization; "
            f"received bits={bits!r}.")
    return int(bits)


def _q_max(bits):
    return 2 ** (bits - 1) - 1


def quantize_symmetric(values, bits, axis):
    """Quantize a float array symmetrically with one scale per index of ``axis``.

    Args:
      values: float numpy array.
      bits: 4 or 8.
      axis: the channel axis that gets its own scale; every other axis is reduced.

    Returns:
      ``(q, scale)``: int8 array of the shape of ``values`` with entries in
      [-q_max, q_max], and the float32 scales of shape ``[values.shape[axis]]``.
      An all-zero channel gets scale 1 so that dequantization stays finite.
    """
    bits = _check_bits(bits)
    values = np.asarray(values, np.float32)
    axis = axis % values.ndim
    reduce_axes = tuple(i for i in range(values.ndim) if i != axis)
    q_max = _q_max(bits)
    scale = np.max(np.abs(values), axis=reduce_axes) / q_max
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    shape = [1] * values.ndim
    shape[axis] = -1
    q = np.clip(np.round(values / scale.reshape(shape)), -q_max, q_max).astype(np.int8)
    return q, scale


def pack_int4(q, axis=0):
    """Pack int4 values (int8 array with entries in [-8, 7]) two per byte along ``axis``.

    An odd length is padded with one zero. The result has ``ceil(n / 2)`` entries along
    ``axis``: index ``2j`` in the low nibble and ``2j + 1`` in the high nibble of byte j.
    """
    q = np.moveaxis(np.asarray(q, np.int8), axis, 0)
    if q.min(initial=0) < -8 or q.max(initial=0) > 7:
        raise ValueError(
            f"int4 values must be in [-8, 7]; received values in [{q.min()}, {q.max()}].")
    if q.shape[0] % 2:
        q = np.concatenate([q, np.zeros((1,) + q.shape[1:], np.int8)], axis=0)
    low = q[0::2].astype(np.uint8) & 0x0F
    high = (q[1::2].astype(np.uint8) & 0x0F) << 4
    packed = (low | high).view(np.int8)
    return np.moveaxis(packed, 0, axis)


def unpack_int4(packed, length, axis=0):
    """Inverse of ``pack_int4`` on a tensor: returns int8 values, ``length`` along ``axis``."""
    packed = tf.convert_to_tensor(packed, tf.int8)
    rank = packed.shape.rank
    axis = axis % rank
    perm = [axis] + [i for i in range(rank) if i != axis]
    packed = tf.transpose(packed, perm) if axis else packed
    # Arithmetic shifts on int8 sign-extend each nibble back to a value in [-8, 7].
    low = tf.bitwise.right_shift(tf.bitwise.left_shift(packed, 4), 4)
    high = tf.bitwise.right_shift(packed, 4)
    values = tf.stack([low, high], axis=1)
    shape = tf.concat([[2 * tf.shape(packed)[0]], tf.shape(packed)[1:]], axis=0)
    values = tf.reshape(values, shape)[:length]
    if axis:
        values = tf.transpose(values, np.argsort(perm))
    return values


class _WeightOnlyMixin:
    """Storage shared by the weight-only layers: an int8 tensor, its scales, unpacking."""

    def _add_quantized(self, name, shape, scale_shape):
        # Integer variables cannot be trained; the layer is an inference (or frozen) layer.
        self.quantized_kernel = self.add_weight(
            name=name, shape=shape, dtype=tf.int8, initializer="zeros", trainable=False)
        self.kernel_scale = self.add_weight(
            name="kernel_scale", shape=scale_shape, dtype=tf.float32, initializer="ones",
            trainable=False, experimental_autocast=False)

    def compressed_bytes(self):
        """Bytes of the stored weights: int8 kernel, float32 scales and bias."""
        return int(sum(np.prod(v.shape) * v.dtype.size for v in self.weights))

    def parameter_count(self):
        """Number of kernel values (int4 pairs counted as two), scales and bias."""
        others = sum(int(np.prod(v.shape)) for v in self.weights
                     if v is not self.quantized_kernel)
        return others + self.input_dim * self._kernel_columns()


@keras.utils.register_keras_serializable(package="tfcompress")
class WeightOnlyQuantDense(_WeightOnlyMixin, keras.layers.Layer):
    """A Dense layer whose kernel is stored as int8 or packed int4 with per-column scales.

    ``outputs = activation(inputs @ (Q * s) + bias)``, where ``Q`` is the [in, units]
    integer kernel and ``s`` the [units] float32 scales (see the module docstring). For
    bits=4, ``quantized_kernel`` is [ceil(in / 2), units] with two input rows per byte.

    Build one from a trained float layer with
    ``tfcompress.layers.quantize(layer, mode="weight_only", bits=...)`` or
    ``WeightOnlyQuantDense.from_float(layer, bits)``.

    Args:
      units: output width.
      bits: 8 or 4. Defaults to 8.
      activation: as keras Dense. Defaults to None.
      use_bias: whether a float32 bias is added. Defaults to True.

    Input shape: [..., in]. Output shape: [..., units].

    >>> layer = WeightOnlyQuantDense(4, bits=4)
    >>> layer(tf.zeros([2, 3])).shape
    TensorShape([2, 4])
    """

    def __init__(self, units, bits=8, activation=None, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        if isinstance(units, bool) or not isinstance(units, (int, np.integer)) or units < 1:
            raise ValueError(f"units must be a positive integer; received {units!r}.")
        self.units = int(units)
        self.bits = _check_bits(bits)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)

    def build(self, input_shape):
        last = tf.TensorShape(input_shape)[-1]
        if last is None:
            raise ValueError(
                f"The last dimension of the inputs of {self.name!r} must be known; "
                f"received input shape {tf.TensorShape(input_shape)}.")
        self.input_dim = int(last)
        rows = self.input_dim if self.bits == 8 else (self.input_dim + 1) // 2
        self._add_quantized("quantized_kernel", [rows, self.units], [self.units])
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=[self.units],
                                        initializer="zeros", trainable=True)
        super().build(input_shape)

    @property
    def kernel(self):
        """The dequantized float32 [in, units] kernel."""
        q = self.quantized_kernel
        if self.bits == 4:
            q = unpack_int4(q, self.input_dim, axis=0)
        return tf.cast(q, tf.float32) * self.kernel_scale

    def call(self, inputs):
        kernel = tf.cast(self.kernel, self.compute_dtype)
        if inputs.shape.rank == 2:
            outputs = tf.matmul(inputs, kernel)
        else:
            outputs = tf.tensordot(inputs, kernel, [[inputs.shape.rank - 1], [0]])
        if self.bias is not None:
            outputs = outputs + tf.cast(self.bias, outputs.dtype)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)[:-1].concatenate([self.units])

    def _kernel_columns(self):
        return self.units

    def set_float_weights(self, kernel, bias=None):
        """Quantize a float [in, units] kernel (and set the bias) into this built layer."""
        kernel = np.asarray(kernel, np.float32)
        expected = (self.input_dim, self.units)
        if kernel.shape != expected:
            raise ValueError(
                f"kernel must have shape {expected} for layer {self.name!r}; received "
                f"{kernel.shape}.")
        q, scale = quantize_symmetric(kernel, self.bits, axis=-1)
        if self.bits == 4:
            q = pack_int4(q, axis=0)
        self.quantized_kernel.assign(q)
        self.kernel_scale.assign(scale)
        if self.bias is not None:
            self.bias.assign(np.zeros([self.units], np.float32) if bias is None else bias)

    @classmethod
    def from_float(cls, layer, bits=8, kernel=None):
        """Build the weight-only copy of a built Dense-like ``layer`` (named like it).

        ``kernel`` overrides the float kernel read from ``layer.kernel``, for example the
        effective kernel of a layer with kernel transforms.
        """
        kernel = np.asarray(layer.kernel if kernel is None else kernel, np.float32)
        bias = getattr(layer, "bias", None)
        new = cls(kernel.shape[-1], bits=bits, activation=layer.activation,
                  use_bias=bias is not None, name=layer.name, dtype=layer.dtype_policy)
        new.build(tf.TensorShape([None, kernel.shape[0]]))
        new.set_float_weights(kernel, None if bias is None else bias.numpy())
        return new

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, bits=self.bits, use_bias=self.use_bias,
                      activation=keras.activations.serialize(self.activation))
        return config


@keras.utils.register_keras_serializable(package="tfcompress")
class WeightOnlyQuantEmbedding(_WeightOnlyMixin, keras.layers.Layer):
    """An Embedding whose table is stored as int8 or packed int4 with one scale per row.

    ``outputs = Q[ids] * s[ids]``: only the looked-up rows are dequantized. Per-row scales
    (one per token) keep a rare token with small values from sharing the range of a large
    one. For bits=4, ``quantized_kernel`` is [input_dim, ceil(output_dim / 2)].

    Args:
      input_dim: vocabulary size.
      output_dim: embedding width.
      bits: 8 or 4. Defaults to 8.
      mask_zero: as keras Embedding. Defaults to False.

    Input shape: integer ids [...]. Output shape: [..., output_dim].
    """

    def __init__(self, input_dim, output_dim, bits=8, mask_zero=False, **kwargs):
        super().__init__(**kwargs)
        for argument, value in (("input_dim", input_dim), ("output_dim", output_dim)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{argument} must be a positive integer; received {value!r}.")
        self.input_dim = int(input_dim)
        self.output_dim = int(output_dim)
        self.bits = _check_bits(bits)
        self.mask_zero = bool(mask_zero)

    def build(self, input_shape=None):
        columns = self.output_dim if self.bits == 8 else (self.output_dim + 1) // 2
        self._add_quantized("quantized_kernel", [self.input_dim, columns], [self.input_dim])
        super().build(input_shape)

    @property
    def embeddings(self):
        """The dequantized float32 [input_dim, output_dim] table."""
        return self._dequantize(self.quantized_kernel, self.kernel_scale)

    def _dequantize(self, q, scale):
        if self.bits == 4:
            q = unpack_int4(q, self.output_dim, axis=-1)
        return tf.cast(q, tf.float32) * scale[..., tf.newaxis]

    def call(self, inputs):
        ids = tf.cast(inputs, tf.int32)
        rows = tf.gather(self.quantized_kernel, ids)
        scales = tf.gather(self.kernel_scale, ids)
        return tf.cast(self._dequantize(rows, scales), self.compute_dtype)

    def compute_mask(self, inputs, mask=None):
        if not self.mask_zero:
            return None
        return tf.not_equal(inputs, 0)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape).concatenate([self.output_dim])

    def _kernel_columns(self):
        return self.output_dim

    def set_float_weights(self, table):
        """Quantize a float [input_dim, output_dim] table into this built layer."""
        table = np.asarray(table, np.float32)
        expected = (self.input_dim, self.output_dim)
        if table.shape != expected:
            raise ValueError(
                f"table must have shape {expected} for layer {self.name!r}; received "
                f"{table.shape}.")
        q, scale = quantize_symmetric(table, self.bits, axis=0)
        if self.bits == 4:
            q = pack_int4(q, axis=-1)
        self.quantized_kernel.assign(q)
        self.kernel_scale.assign(scale)

    @classmethod
    def from_float(cls, layer, bits=8):
        """Build the weight-only copy of a built keras ``Embedding`` (named like it)."""
        table = layer.embeddings.numpy()
        new = cls(table.shape[0], table.shape[1], bits=bits,
                  mask_zero=bool(getattr(layer, "mask_zero", False)), name=layer.name,
                  dtype=layer.dtype_policy)
        new.build()
        new.set_float_weights(table)
        return new

    def get_config(self):
        config = super().get_config()
        config.update(input_dim=self.input_dim, output_dim=self.output_dim, bits=self.bits,
                      mask_zero=self.mask_zero)
        return config
