"""Calibration data: batches of model inputs, and the inputs each layer receives.

``calibration_data`` may be a ``tf.data.Dataset`` of inputs or of ``(inputs, labels)``
pairs, a dict of input arrays, one input array, or an ``(inputs, labels)`` tuple.
Arrays are cut into batches of ``BATCH_SIZE`` rows. At most ``MAX_BATCHES`` batches are
read so that the probes stay quick; a dataset with larger batches gives more statistics.
"""

import numpy as np

from tfcompress._keras import keras, tf

BATCH_SIZE = 32
MAX_BATCHES = 4


def _split_pair(element):
    if isinstance(element, tuple) and len(element) in (2, 3):
        return element[0], element[1]
    return element, None


def iterate_batches(data, max_batches=MAX_BATCHES):
    """Yield ``(inputs, labels)`` numpy batches from calibration data; labels may be None."""
    if isinstance(data, tf.data.Dataset):
        for count, element in enumerate(data):
            if count >= max_batches:
                return
            inputs, labels = _split_pair(element)
            yield (tf.nest.map_structure(np.asarray, inputs),
                   None if labels is None else np.asarray(labels))
        return

    inputs, labels = _split_pair(data)
    if not isinstance(inputs, (dict, list, np.ndarray, tf.Tensor)):
        raise TypeError(
            "calibration_data must be a tf.data.Dataset, a dict of input arrays, an input "
            f"array or an (inputs, labels) tuple; received {type(data).__name__}.")
    inputs = tf.nest.map_structure(np.asarray, inputs)
    rows = len(tf.nest.flatten(inputs)[0])
    if rows == 0:
        raise ValueError("calibration_data has no rows; pass at least one example.")
    for count, start in enumerate(range(0, rows, BATCH_SIZE)):
        if count >= max_batches:
            return
        batch = tf.nest.map_structure(lambda a: a[start:start + BATCH_SIZE], inputs)
        yield batch, None if labels is None else np.asarray(labels)[start:start + BATCH_SIZE]


def capture_layer_inputs(model, layers, data, max_batches=MAX_BATCHES):
    """Return ``{layer name: list of input batches}`` for layers of a functional model.

    A probe ``keras.Model(model.inputs, [layer.input, ...])`` computes every layer's
    inputs in one pass per batch. A layer's input is a tensor or, for layers called on a
    list (AttentionCore), a list of arrays. A layer called more than once contributes the
    inputs of its first call.
    """
    if not layers:
        return {}
    probe = keras.Model(model.inputs, [layer.get_input_at(0) for layer in layers])
    captured = {layer.name: [] for layer in layers}
    for inputs, _ in iterate_batches(data, max_batches):
        outputs = probe(inputs, training=False)
        if len(layers) == 1:
            outputs = [outputs]
        for layer, value in zip(layers, outputs):
            captured[layer.name].append(tf.nest.map_structure(np.asarray, value))
    if not any(captured.values()):
        raise ValueError("calibration_data produced no batches; pass a non-empty dataset.")
    return captured


def concatenate(batches):
    """Concatenate a list of input batches (tensors or lists of tensors) along axis 0."""
    return tf.nest.map_structure(lambda *parts: np.concatenate(parts, axis=0), *batches)
