"""Weightless and small layers of the BERT encoder.

The projections (query, key, value, attention output, FFN) are plain ``Dense`` layers
so that compression can replace each one. This module contains the rest: the attention
core (scaled dot-product attention over heads), the position embedding table and the
masked mean pooling of sentence-transformers.
"""

import math

from tfcompress._keras import keras, tf

# Padded keys are pushed this far below the smallest score of their row, so each gets at
# most exp(-20) ~ 2e-9 of the weight of any attended key.
MASK_MARGIN = 20.0


def mask_scores(scores, mask):
    """Push the attention scores of padded keys below every attended key's score.

    ``scores`` is [batch, heads, seq_q, seq_k] and ``mask`` [batch, seq_k] (1 = attend).
    The shift is the row's own score range plus ``MASK_MARGIN`` rather than a fixed large
    constant such as -10000. The masked scores then stay within about twice the natural
    score range, which int8 quantization of the softmax input can still resolve, whereas
    a -10000 bias makes the int8 step about 40. Nothing overflows in float16 either.
    """
    mask = tf.cast(mask, scores.dtype)[:, tf.newaxis, tf.newaxis, :]
    spread = (tf.reduce_max(scores, axis=-1, keepdims=True)
              - tf.reduce_min(scores, axis=-1, keepdims=True))
    return scores - (1.0 - mask) * (tf.stop_gradient(spread) + MASK_MARGIN)


@keras.utils.register_keras_serializable(package="tfcompress")
class AttentionCore(keras.layers.Layer):
    """Scaled dot-product attention of projected queries, keys and values.

    ``softmax(mask_scores(Q K^T / sqrt(d), mask)) V`` per head, where Q, K, V are
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
        return tf.nn.softmax(mask_scores(scores, mask), axis=-1)

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
