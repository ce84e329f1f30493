"""Activation recomputation per transformer block (gradient checkpointing).

``tf.recompute_grad`` keeps only a block's inputs during the forward pass and runs the
block again in the backward pass to get the activations its gradient needs. Peak
activation memory drops from the sum over all blocks to the block inputs plus one
block's activations, for about one extra forward pass of compute.

What this module adds to ``tf.recompute_grad``: a Keras layer that wraps one block
sub-model and saves and reloads with the model, and ``recompute_model``, which cuts a
flat tfcompress encoder or classifier into its blocks and wraps each one.
"""

from tfcompress._keras import keras, tf
from tfcompress.train.blocks import replace_blocks


@keras.utils.register_keras_serializable(package="tfcompress")
class RecomputeBlock(keras.layers.Layer):
    """Run a block sub-model and recompute its activations in the backward pass.

    Args:
      block: a tf_keras Model mapping ``[hidden, mask]`` to the block output.

    Call arguments:
      inputs: list ``[hidden, mask]``; hidden is [batch, seq, width], mask [batch, seq].
      training: passed to the block (dropout).

    Output shape: the block's output shape.
    """

    def __init__(self, block, **kwargs):
        # The block's own layers carry their dtype policies. This wrapper casts nothing,
        # so a float32 LayerNorm output enters the block unchanged.
        kwargs.setdefault("dtype", "float32")
        kwargs["autocast"] = False
        super().__init__(**kwargs)
        if not isinstance(block, keras.Model):
            raise TypeError(f"block must be a tf_keras Model; received {type(block).__name__}.")
        self.block = block

    def call(self, inputs, training=None):
        hidden, mask = inputs

        # The mask is closed over rather than passed, so tf.recompute_grad does not try
        # to differentiate with respect to an integer tensor.
        def forward(x):
            return self.block([x, mask], training=training)

        return tf.recompute_grad(forward)(hidden)

    def compute_output_shape(self, input_shape):
        return self.block.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.pop("autocast", None)
        config["block"] = keras.layers.serialize(self.block)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["block"] = keras.layers.deserialize(config["block"])
        return cls(**config)


def recompute_model(model):
    """Return ``model`` rebuilt so each transformer block recomputes its activations.

    The new model shares every layer, and so every weight, with ``model``: training
    either trains both. Outputs and gradients equal those of ``model``.

    Args:
      model: a flat functional tfcompress encoder or classifier (layers named
        ``transformer/layer_{i}/...``).

    Returns:
      A functional tf_keras model with one ``RecomputeBlock`` per transformer block,
      named ``transformer/layer_{i}/recompute``.
    """
    return replace_blocks(
        model, lambda block: RecomputeBlock(block.model,
                                            name=f"transformer/layer_{block.index}/recompute"))
