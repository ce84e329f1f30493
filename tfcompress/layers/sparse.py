"""A Dense layer that stores and multiplies only the nonzero weights of its kernel.

``SparseDense`` keeps the nonzeros of the kernel K [in, units] as ``values`` [nnz]
float32 and their positions in the transposed kernel K^T [units, in] as ``indices``
[nnz, 2]. The indices are int16 when both dimensions fit (at most 32767, which covers
BERT widths and vocabularies), else int32, so storage is ``nnz * (4 + 2 * 2)`` or
``nnz * (4 + 2 * 4)`` bytes plus the bias. Storing K^T lets the product use
``tf.sparse.sparse_dense_matmul`` with the sparse operand first:
``x @ K = (K^T @ x^T)^T``.

What this module adds: TensorFlow has sparse matmul ops but no Keras layer around them,
and tfmot's pruned layers store the zeros densely.
"""

import logging
import warnings

import numpy as np

from tfcompress._keras import keras, tf
from tfcompress.layers.base import (
    CompressedDense,
    _dense_config_items,
    _DenseMixin,
)
from tfcompress.layers.pruning import PruningMask

logger = logging.getLogger(__name__)

__all__ = ["SparseDense", "to_sparse"]

_INT16_MAX = np.iinfo(np.int16).max


@keras.utils.register_keras_serializable(package="tfcompress")
class SparseDense(_DenseMixin, keras.layers.Layer):
    """``activation(x @ K + bias)`` with K stored as its ``nnz`` nonzeros.

    Build one from a pruned layer with ``to_sparse``. A layer constructed directly has
    random values at zero indices until weights are loaded into it.

    Args:
      units: output width.
      nnz: number of stored nonzeros.
      index_dtype: ``"int16"`` or ``"int32"`` for the stored indices; None picks int16
        when ``max(in, units) <= 32767``.
      activation, use_bias, bias_initializer, bias_regularizer, bias_constraint: as keras
        Dense.

    Weights: ``values`` [nnz] float32 (trainable), ``indices`` [nnz, 2] (row in units,
    column in in) of K^T, ``bias`` [units].

    Input shape: [..., in]. Output shape: [..., units].
    """

    def __init__(self, units, nnz, index_dtype=None, activation=None, use_bias=True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, kernel_constraint=None,
                 bias_constraint=None, **kwargs):
        super().__init__(**kwargs)
        self._init_dense(units, activation, use_bias, kernel_initializer, bias_initializer,
                         kernel_regularizer, bias_regularizer, kernel_constraint,
                         bias_constraint)
        if isinstance(nnz, bool) or not isinstance(nnz, (int, np.integer)) or nnz < 0:
            raise ValueError(f"nnz must be a non-negative integer; received nnz={nnz!r}.")
        if index_dtype not in (None, "int16", "int32"):
            raise ValueError(
                f"index_dtype must be None, 'int16' or 'int32'; received {index_dtype!r}.")
        self.nnz = int(nnz)
        self.index_dtype = index_dtype

    def build(self, input_shape):
        self.input_dim = int(tf.TensorShape(input_shape)[-1])
        index_dtype = self.index_dtype
        if index_dtype is None:
            index_dtype = "int16" if max(self.input_dim, self.units) <= _INT16_MAX else "int32"
        elif index_dtype == "int16" and max(self.input_dim, self.units) > _INT16_MAX:
            raise ValueError(
                f"Layer {self.name!r}: int16 indices cannot address a {self.input_dim}x"
                f"{self.units} kernel; use index_dtype='int32' or None.")
        self.values = self.add_weight(
            name="values", shape=[self.nnz], dtype="float32",
            initializer=self.kernel_initializer, regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint, trainable=True,
            # Stored float32 under mixed precision and cast once in call().
            experimental_autocast=False)
        self.indices = self.add_weight(
            name="indices", shape=[self.nnz, 2], dtype=index_dtype,
            initializer="zeros", trainable=False)
        self._add_bias([self.units])
        super().build(input_shape)

    def _transposed_kernel(self, dtype):
        return tf.sparse.SparseTensor(
            indices=tf.cast(self.indices, tf.int64),
            values=tf.cast(self.values, dtype),
            dense_shape=[self.units, self.input_dim])

    def call(self, inputs):
        flat = tf.reshape(inputs, [-1, self.input_dim])
        # (K^T @ x^T)^T: the sparse operand must come first.
        outputs = tf.transpose(tf.sparse.sparse_dense_matmul(
            self._transposed_kernel(inputs.dtype), flat, adjoint_b=True))
        outputs = tf.reshape(outputs, tf.concat([tf.shape(inputs)[:-1], [self.units]], 0))
        return self._finish(outputs)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)[:-1].concatenate([self.units])

    def dense_kernel(self):
        """Return the dense [in, units] float32 kernel as a numpy array."""
        kernel_t = tf.sparse.to_dense(tf.sparse.reorder(self._transposed_kernel(tf.float32)))
        return kernel_t.numpy().T

    def parameter_count(self):
        """Number of stored parameters: the nonzeros and the bias (indices not counted)."""
        return self.nnz + (self.units if self.use_bias else 0)

    def compressed_bytes(self):
        """Bytes of values, indices and bias."""
        return int(sum(np.prod(v.shape) * v.dtype.size for v in self.weights))

    def strip(self):
        """Return ``self``: a SparseDense has no training-only state to remove."""
        return self

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, nnz=self.nnz, index_dtype=self.index_dtype,
                      **_dense_config_items(self))
        return config


def to_sparse(layer, index_dtype=None):
    """Return a new built ``SparseDense`` holding the nonzeros of ``layer``'s kernel.

    Args:
      layer: a built keras Dense, or a ``CompressedDense`` whose only transforms are
        ``PruningMask`` (the masks are applied first). The source is untouched.
      index_dtype: see ``SparseDense``.

    Warns when the sparse storage is not smaller than the dense float32 kernel.
    """
    if not isinstance(layer, (keras.layers.Dense, CompressedDense)):
        raise TypeError(
            "to_sparse accepts keras Dense and CompressedDense layers; received "
            f"{type(layer).__name__} ({getattr(layer, 'name', layer)!r}).")
    if not layer.built:
        raise ValueError(f"Layer {layer.name!r} must be built before to_sparse().")
    if isinstance(layer, CompressedDense):
        others = [type(t).__name__ for t in layer.transforms.get("kernel", [])
                  if not isinstance(t, PruningMask)]
        if others or layer.input_quantizer is not None:
            raise NotImplementedError(
                f"Layer {layer.name!r} has the kernel transforms {others} or an input "
                "quantizer, which SparseDense cannot keep. Convert to sparse before "
                "quantization, or strip the layer first.")
        kernel = layer.effective_kernel("kernel", training=False).numpy()
    else:
        kernel = layer.kernel.numpy()
    input_dim, units = kernel.shape
    # Row-major positions of K^T are the canonical order tf.sparse expects.
    rows, columns = np.nonzero(kernel.T)
    nnz = int(rows.size)
    new = SparseDense(units, nnz, index_dtype=index_dtype, name=layer.name,
                      dtype=layer.dtype_policy, **_dense_config_items(layer))
    new.build([None, input_dim])
    new.values.assign(kernel.T[rows, columns].astype(np.float32))
    new.indices.assign(np.stack([rows, columns], axis=1).astype(new.indices.dtype.as_numpy_dtype))
    if new.bias is not None:
        new.bias.assign(layer.bias.numpy())

    dense_bytes = kernel.size * 4
    sparse_bytes = new.values.dtype.size * nnz + new.indices.dtype.size * 2 * nnz
    if sparse_bytes >= dense_bytes:
        warnings.warn(
            f"Layer {layer.name!r}: {nnz} nonzeros of {kernel.size} take {sparse_bytes} "
            f"bytes as sparse values and indices, not less than the {dense_bytes} bytes "
            "of the dense kernel. Prune further or keep the layer dense.", stacklevel=2)
    logger.info("Layer %s: %d nonzeros of %d stored sparse.", layer.name, nnz, kernel.size)
    return new
