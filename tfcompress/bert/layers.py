"""Weightless and small layers of the BERT encoder.

The projections (query, key, value, attention output, FFN) are plain ``Dense`` layers
so that compression can replace each one; what remains here is the attention core
(scaled dot-product attention over heads), the position embedding table and the masked
mean pooling of sentence-transformers.
"""

import math

from tfcompress._keras import keras, tf

# Added to the attention scores of padded keys. Scores and softmax run in float32, and
# exp(-10000) is 0 in float32, so padded keys get zero weight while the constant stays
# representable in float16 (max 65504) should a caller cast the bias down.
MASK_BIAS = -10000.0


@keras.utils.register_keras_serializable(package="tfcompress")
class AttentionCore(keras.layers.Layer):
    """Scaled dot-product attention of projected queries, keys and values.

    ``softmax(Q K^T / sqrt(d) + (1 - mask) * MASK_BIAS) V`` per head, where Q, K, V are
    [batch, seq, heads * d] projections split into ``num_heads`` heads of width
    ``head_size`` and ``mask`` is the [batch, seq] key mask (1 = attend, 0 = padding).
    The scores and the softmax are computed in float32 whatever the compute dtype.

    Args:
      num_heads: number of attention heads.
      head_size: width d of one head.
      dropout_rate: dropout on the attention probabilities.

    Call arguments:
      inputs: list ``[query, key, value, mask]``.
      training: whether dropout is active.

    Output shape: [batch, seq, heads * head_size], in the layer's compute dtype.
    """

    def __init__(self, num_heads, head_size, dropout_rate=0.0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive integer; received {num_heads!r}.")
        if not isinstance(head_size, int) or head_size < 1:
            raise ValueError(f"head_size must be a positive integer; received {head_size!r}.")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1); received {dropout_rate!r}.")
        self.num_heads = num_heads
        self.head_size = head_size
        self.dropout_rate = dropout_rate
        self._dropout = keras.layers.Dropout(dropout_rate)

    def _split_heads(self, x):
        batch, seq = tf.shape(x)[0], tf.shape(x)[1]
        x = tf.reshape(x, [batch, seq, self.num_heads, self.head_size])
        return tf.transpose(x, [0, 2, 1, 3])

    def attention_probs(self, query, key, mask):
        """Return the [batch, heads, seq_q, seq_k] float32 attention weights."""
        q = self._split_heads(query)
        k = self._split_heads(key)
        scores = tf.matmul(q, k, transpose_b=True)
        scores = tf.cast(scores, tf.float32) * (1.0 / math.sqrt(self.head_size))
        mask = tf.cast(mask, tf.float32)[:, tf.newaxis, tf.newaxis, :]
        scores += (1.0 - mask) * MASK_BIAS
        return tf.nn.softmax(scores, axis=-1)

    def call(self, inputs, training=None):
        query, key, value, mask = inputs
        probs = self.attention_probs(query, key, mask)
        probs = self._dropout(probs, training=training)
        v = self._split_heads(value)
        context = tf.matmul(tf.cast(probs, v.dtype), v)
        context = tf.transpose(context, [0, 2, 1, 3])
        batch, seq = tf.shape(context)[0], tf.shape(context)[1]
        return tf.reshape(context, [batch, seq, self.num_heads * self.head_size])

    def get_config(self):
        config = super().get_config()
        config.update(num_heads=self.num_heads, head_size=self.head_size,
                      dropout_rate=self.dropout_rate)
        return config


@keras.utils.register_keras_serializable(package="tfcompress")
class PositionEmbedding(keras.layers.Layer):
    """Learned absolute position embeddings, sliced to the input's sequence length.

    Args:
      max_length: rows of the table, the longest sequence supported.
      initializer: initializer of the table.

    Input shape: [batch, seq, hidden] (only seq is read). Output shape: [1, seq, hidden].
    """

    def __init__(self, max_length, initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer; received {max_length!r}.")
        self.max_length = max_length
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            "embeddings", shape=[self.max_length, int(input_shape[-1])],
            initializer=self.initializer)
        super().build(input_shape)

    def call(self, inputs):
        seq = tf.shape(inputs)[1]
        return tf.cast(self.embeddings[tf.newaxis, :seq, :], self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(max_length=self.max_length,
                      initializer=keras.initializers.serialize(self.initializer))
        return config


@keras.utils.register_keras_serializable(package="tfcompress")
class MaskedMeanPooling(keras.layers.Layer):
    """Mean of the token vectors where the mask is 1 (sentence-transformers pooling).

    Call arguments: ``[sequence, mask]`` with shapes [batch, seq, hidden] and
    [batch, seq]. Output shape: [batch, hidden] in float32.
    """

    def call(self, inputs):
        sequence, mask = inputs
        sequence = tf.cast(sequence, tf.float32)
        mask = tf.cast(mask, tf.float32)[:, :, tf.newaxis]
        total = tf.reduce_sum(sequence * mask, axis=1)
        # max() keeps an all-padding row at zero instead of NaN, as sentence-transformers does.
        count = tf.maximum(tf.reduce_sum(mask, axis=1), 1e-9)
        return total / count
