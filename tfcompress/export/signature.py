"""Fixed-shape serving signatures and the example data fed through them.

A TFLite model gets one signature, ``serving_default``, with a fixed shape per input:
batch 1 (one example per invoke, the shape latency is measured at) and, for token
inputs, a fixed sequence length. Data given as a dict of arrays, a single array, or a
``tf.data.Dataset`` (batched or not, with or without labels) is normalised here into
single examples padded or truncated to that length.
"""

import dataclasses
import re

import numpy as np

from tfcompress._keras import keras, tf

_NON_NAME = re.compile(r"[^0-9A-Za-z_]")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One input of the serving signature: name, dtype and fixed shape [1, ...]."""

    name: str
    dtype: str
    shape: tuple

    @property
    def is_integer(self):
        return np.issubdtype(np.dtype(self.dtype), np.integer)

    def tensor_spec(self):
        return tf.TensorSpec(self.shape, tf.as_dtype(self.dtype), name=self.name)


def signature_name(name):
    """Return ``name`` with every character outside [0-9A-Za-z_] replaced by ``_``."""
    return _NON_NAME.sub("_", name)


def input_specs(model, seq_length=None):
    """Return the ``InputSpec`` of each model input, batch fixed to 1.

    The one unknown dimension after the batch (the sequence axis of token inputs) is
    set to ``seq_length``. Inputs with more unknown dimensions are rejected.
    """
    if not model.inputs:
        raise ValueError(
            f"model {model.name!r} has no defined inputs; build it on keras.Input "
            "tensors (or call it once on data) before exporting it."
        )
    specs = []
    for tensor in model.inputs:
        name = signature_name(tensor.name.split(":")[0])
        shape = list(tensor.shape)
        unknown = [i for i, dim in enumerate(shape[1:], start=1) if dim is None]
        if len(unknown) > 1:
            raise ValueError(
                f"input {name!r} has shape {tuple(shape)} with {len(unknown)} unknown "
                "dimensions after the batch; a fixed signature can fill in only one "
                "(the sequence length). Give the model inputs a fixed shape."
            )
        if unknown:
            if seq_length is None:
                raise ValueError(
                    f"input {name!r} has shape {tuple(shape)}, whose sequence length is "
                    "unknown; pass seq_length (for example seq_length=128) or "
                    "verify_data to take it from."
                )
            shape[unknown[0]] = seq_length
        elif seq_length is not None and len(shape) > 1 and shape[1] != seq_length:
            raise ValueError(
                f"seq_length={seq_length} does not match input {name!r} of fixed shape "
                f"{tuple(shape)}; pass seq_length={shape[1]} or None."
            )
        shape[0] = 1
        specs.append(InputSpec(name, tensor.dtype.name, tuple(int(d) for d in shape)))
    return specs


def call_model(model, inputs):
    """Call ``model`` on a dict of signature inputs in the structure it was built with."""
    structure = model.input
    if isinstance(structure, dict):
        by_name = {signature_name(tensor.name.split(":")[0]): key
                   for key, tensor in structure.items()}
        return model({by_name[name]: value for name, value in inputs.items()},
                     training=False)
    names = [signature_name(t.name.split(":")[0]) for t in model.inputs]
    if len(names) == 1:
        return model(inputs[names[0]], training=False)
    return model([inputs[name] for name in names], training=False)


def flatten_outputs(model, outputs):
    """Return the model outputs as a flat dict of named tensors.

    Dict outputs keep their keys; lists inside them get ``_0``, ``_1``... suffixes.
    A single tensor output is named after the model's output layer.
    """
    if isinstance(outputs, dict):
        flat = {}
        for key, value in outputs.items():
            if isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    flat[f"{signature_name(key)}_{i}"] = item
            else:
                flat[signature_name(key)] = value
        return flat
    if isinstance(outputs, (list, tuple)):
        return {signature_name(name): value
                for name, value in zip(model.output_names, outputs)}
    return {signature_name(model.output_names[0]): outputs}


def _as_numpy(value):
    if isinstance(value, tf.Tensor):
        return value.numpy()
    return np.asarray(value)


def _fit_length(array, length, name):
    # Pads with zeros, the [PAD] id and a masked position for BERT inputs.
    if array.shape[1] == length:
        return array
    if array.shape[1] > length:
        return array[:, :length]
    pad = [(0, 0)] * array.ndim
    pad[1] = (0, length - array.shape[1])
    return np.pad(array, pad)


def _check_dtype(array, spec, argument):
    if spec.is_integer and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            f"{argument}[{spec.name!r}] has dtype {array.dtype}, but model input "
            f"{spec.name!r} takes {spec.dtype} token ids; pass integer arrays, for "
            "example ids.astype(np.int32)."
        )
    if not spec.is_integer and not np.issubdtype(array.dtype, np.number):
        raise TypeError(
            f"{argument}[{spec.name!r}] has dtype {array.dtype}; model input "
            f"{spec.name!r} takes {spec.dtype} values."
        )


def _batch_to_dict(features, specs, argument):
    if isinstance(features, dict):
        renamed = {signature_name(k): v for k, v in features.items()}
        missing = [s.name for s in specs if s.name not in renamed]
        if missing:
            raise ValueError(
                f"{argument} lacks the model inputs {missing}; it has keys "
                f"{sorted(renamed)}. Pass a dict keyed by the model's input names."
            )
        return {s.name: _as_numpy(renamed[s.name]) for s in specs}
    if isinstance(features, (list, tuple)) and len(specs) > 1:
        if len(features) != len(specs):
            raise ValueError(
                f"{argument} contains {len(features)} arrays, but the model has "
                f"{len(specs)} inputs {[s.name for s in specs]}."
            )
        return {s.name: _as_numpy(v) for s, v in zip(specs, features)}
    if len(specs) != 1:
        raise ValueError(
            f"{argument} is a single array, but the model has {len(specs)} inputs "
            f"{[s.name for s in specs]}; pass a dict keyed by input name."
        )
    return {specs[0].name: _as_numpy(features)}


def _split_batch(batch, specs, argument):
    """Yield single examples of shape [1, ...] from one batch dict."""
    rows = None
    for spec in specs:
        array = batch[spec.name]
        _check_dtype(array, spec, argument)
        if array.ndim == len(spec.shape) - 1:
            array = array[np.newaxis]
        if array.ndim != len(spec.shape):
            raise ValueError(
                f"{argument}[{spec.name!r}] has shape {array.shape}; the model input "
                f"has shape {spec.shape} (batch first)."
            )
        if len(spec.shape) > 1:
            array = _fit_length(array, spec.shape[1], spec.name)
        if array.shape[1:] != spec.shape[1:]:
            raise ValueError(
                f"{argument}[{spec.name!r}] has rows of shape {array.shape[1:]}; the "
                f"model input takes rows of shape {spec.shape[1:]}."
            )
        batch[spec.name] = array.astype(spec.dtype, copy=False)
        if rows is None:
            rows = array.shape[0]
        elif rows != array.shape[0]:
            raise ValueError(
                f"{argument} arrays have different batch sizes: {spec.name!r} has "
                f"{array.shape[0]} rows, another input {rows}."
            )
    for i in range(rows):
        yield {name: array[i:i + 1] for name, array in batch.items()}


def split_features(element):
    """Return ``(features, labels)`` of a dataset element; labels may be None."""
    # A tuple is (features, labels) or (features, labels, sample_weights), as in
    # Keras fit(); several positional inputs come as a list.
    if isinstance(element, tuple) and len(element) in (2, 3):
        return element[0], element[1]
    return element, None


def iterate_examples(data, specs, argument, with_labels=False):
    """Yield single examples (dicts of [1, ...] arrays) from ``data``.

    Args:
      data: a dict of arrays, a single array, a tuple ``(features, labels)`` or a
        ``tf.data.Dataset`` of any of these, batched or not.
      specs: the ``InputSpec`` list of the signature.
      argument: the argument name used in error messages.
      with_labels: yield ``(example, label)`` pairs; the label is None when absent.
    """
    if isinstance(data, tf.data.Dataset):
        elements = data.as_numpy_iterator()
    else:
        elements = [data]
    for element in elements:
        features, labels = split_features(element)
        batch = _batch_to_dict(features, specs, argument)
        examples = _split_batch(batch, specs, argument)
        if not with_labels:
            yield from examples
            continue
        labels = None if labels is None else np.reshape(_as_numpy(labels), [-1])
        for i, example in enumerate(examples):
            yield example, (None if labels is None else labels[i])


def sequence_length_of(data, model):
    """Return the sequence length of the first element of ``data``, or None."""
    unknown = [t for t in model.inputs if len(t.shape) > 1 and t.shape[1] is None]
    if data is None or not unknown:
        return None
    element = next(iter(data)) if isinstance(data, tf.data.Dataset) else data
    features, _ = split_features(element)
    if isinstance(features, dict):
        key = unknown[0].name.split(":")[0]
        renamed = {signature_name(k): v for k, v in features.items()}
        array = renamed.get(signature_name(key))
        if array is None:
            return None
    elif isinstance(features, (list, tuple)):
        array = features[0]
    else:
        array = features
    shape = np.shape(array)
    # An unbatched dataset element has the sequence axis first.
    if isinstance(data, tf.data.Dataset) and len(shape) == len(unknown[0].shape) - 1:
        return int(shape[0])
    return int(shape[1]) if len(shape) > 1 else None


def float32_rebuild(model):
    """Return a float32 copy of a model built under a mixed or float16 policy, else the model.

    The copy is rebuilt from the model's config with every dtype policy set to
    float32 and gets the model's weights. Mixed-precision models keep float32
    variables anyway, so the copy computes what the model computes, minus the
    float16 rounding of activations.
    """
    low = {"float16", "bfloat16"}
    if not any(layer.dtype_policy.compute_dtype in low
               for layer in model._flatten_layers(include_self=True)):
        return model
    try:
        config = model.get_config()
    except NotImplementedError:
        raise NotImplementedError(
            f"model {model.name!r} computes in float16/bfloat16 and, being a subclassed "
            "model without get_config, cannot be rebuilt in float32 for conversion. "
            "Build it again under keras.mixed_precision.set_global_policy('float32'), "
            "copy the weights with set_weights and export that model."
        ) from None
    config = _float32_config(config)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        rebuilt = model.__class__.from_config(config)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    rebuilt.set_weights([np.asarray(w, np.float32) if np.issubdtype(w.dtype, np.floating)
                         else w for w in model.get_weights()])
    return rebuilt


def _float32_config(config):
    if isinstance(config, dict):
        if config.get("class_name") in ("Policy", "DTypePolicy") and isinstance(
                config.get("config"), dict):
            return "float32"
        return {key: ("float32" if key == "dtype" and value in
                      ("float16", "bfloat16", "mixed_float16", "mixed_bfloat16")
                      else _float32_config(value))
                for key, value in config.items()}
    if isinstance(config, list):
        return [_float32_config(item) for item in config]
    return config
