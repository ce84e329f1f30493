"""Mixed-precision policies for training: choose, apply for one call, rebuild a model.

A Keras dtype policy only affects layers created while it is set, so a model built
under float32 keeps computing in float32 after ``set_global_policy``. ``rebuild``
clones a functional model from its config with every layer's dtype rewritten to the
target policy (except the float32 islands below), inside the current distribution
strategy scope, and copies the weights over.

Float32 islands: normalization layers (their mean and variance reductions lose too
much in float16), softmax layers and every layer that produces a model output (logits
feed the float32 loss). ``AttentionCore`` computes its scores and softmax in float32 by
itself.
"""

import contextlib
import logging

from tfcompress._keras import keras, tf

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
_FLOAT32_CLASSES = ("LayerNormalization", "BatchNormalization", "Softmax")


def check_precision(precision):
    """Raise ValueError unless ``precision`` is one of ``PRECISIONS``."""
    if precision in ("float16", "bfloat16"):
        raise ValueError(
            f"precision={precision!r} would store the weights in {precision}, where small "
            "updates round away and training stalls. Use "
            f"precision='mixed_{precision}': {precision} compute with float32 weights."
        )
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; received {precision!r}.")
    return precision


@contextlib.contextmanager
def policy_scope(precision):
    """Set the global Keras dtype policy to ``precision`` and restore the old one after.

    The old policy comes back also when the body raises.
    """
    check_precision(precision)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        yield keras.mixed_precision.global_policy()
    finally:
        keras.mixed_precision.set_global_policy(previous)


def keeps_float32(layer_config, output_layer_names):
    """Return whether a layer (by its serialized config) stays float32 under mixed policies."""
    class_name = layer_config["class_name"]
    config = layer_config["config"]
    if class_name in _FLOAT32_CLASSES or class_name.endswith(">Softmax"):
        return True
    if class_name == "Activation" and config.get("activation") == "softmax":
        return True
    return config.get("name") in output_layer_names


def _output_layer_names(model_config):
    names = set()
    for entry in tf.nest.flatten(model_config.get("output_layers", [])):
        if isinstance(entry, str):
            names.add(entry)
    return names


def _retype(model_config, precision):
    """Rewrite the dtype of every layer in a functional model config, in place."""
    outputs = _output_layer_names(model_config)
    for layer_config in model_config["layers"]:
        config = layer_config["config"]
        if layer_config["class_name"] == "InputLayer":
            continue
        if layer_config["class_name"] in ("Functional", "Model") and "layers" in config:
            _retype(config, precision)
        config["dtype"] = "float32" if keeps_float32(layer_config, outputs) else precision


def needs_rebuild(model, precision):
    """Return whether some layer of ``model`` computes in another dtype than ``precision`` asks."""
    target = keras.mixed_precision.Policy(precision)
    config = model.get_config()
    outputs = _output_layer_names(config)
    for layer_config, layer in zip(config["layers"], model.layers):
        if layer_config["class_name"] == "InputLayer":
            continue
        expected = "float32" if keeps_float32(layer_config, outputs) else target.compute_dtype
        if layer.compute_dtype != expected:
            return True
    return False


def rebuild(model, precision):
    """Clone a functional ``model`` with every layer under ``precision`` and copy its weights.

    The clone is created in the current scope, so calling this inside
    ``strategy.scope()`` gives distributed variables. Variables stay float32.

    Raises:
      ValueError: if ``model`` is subclassed, because only a functional model can be
        rebuilt from its config.
    """
    if not getattr(model, "_is_graph_network", False):
        raise ValueError(
            f"model {model.name!r} is a subclassed {type(model).__name__}, which cannot be "
            f"rebuilt under precision={precision!r}. Build it after "
            f"keras.mixed_precision.set_global_policy({precision!r}) and pass it again."
        )
    config = model.get_config()
    _retype(config, precision)
    clone = model.__class__.from_config(config)
    clone.set_weights(model.get_weights())
    logger.info("Rebuilt model %r under the %s policy.", model.name, precision)
    return clone
