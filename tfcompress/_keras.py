"""The one place tfcompress imports Keras from.

tfcompress runs on Keras 2 (``tf_keras``) because tensorflow-model-optimization and
tensorflow-hub need it. ``TF_USE_LEGACY_KERAS=1`` makes ``tf.keras`` resolve to tf_keras
as well, but it only takes effect if it is set before TensorFlow is first imported, so
this module sets it before importing TensorFlow.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

__all__ = ["keras", "tf", "check_model"]


def _is_keras3_object(obj):
    module = type(obj).__module__
    return module.startswith("keras.") or module == "keras"


def _is_hub_layer(layer):
    return type(layer).__name__ == "KerasLayer" and type(layer).__module__.startswith(
        "tensorflow_hub"
    )


def check_model(model, argument="model", allow_hub_layer=False):
    """Raise a clear error unless ``model`` is a tf_keras model tfcompress can work on.

    Args:
      model: the object passed by the user.
      argument: the argument name used in the error message.
      allow_hub_layer: whether a ``hub.KerasLayer`` inside the model is acceptable.
        Compression needs every projection as its own layer, which a KerasLayer hides.
    """
    if _is_keras3_object(model):
        raise TypeError(
            f"{argument} is a Keras 3 object ({type(model).__module__}."
            f"{type(model).__name__}); tfcompress works on Keras 2 models. Build the "
            "model with `import tf_keras as keras` (or set TF_USE_LEGACY_KERAS=1 before "
            "importing TensorFlow) and pass that model instead."
        )
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"{argument} must be a tf_keras Model; received {type(model).__name__}."
        )
    if not allow_hub_layer:
        for layer in _walk_layers(model):
            if _is_hub_layer(layer):
                raise TypeError(
                    f"{argument} contains the hub.KerasLayer {layer.name!r}, whose "
                    "projections cannot be addressed one by one. Rebuild the encoder "
                    "as a Keras model with tfcompress.bert.from_hub(handle) and use "
                    "that instead."
                )
    return model


def _walk_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _walk_layers(layer)
