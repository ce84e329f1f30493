"""Per-layer parameter and byte tables for Keras models, SavedModels and TFLite files."""

import os

import numpy as np


def _format_bytes(count):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    return f"{count} B"


def layer_table(model):
    """Return rows (layer name, type, parameters, bytes, zero fraction) of a Keras model.

    Bytes are the sizes of the layer's variables in their stored dtypes, so an int8
    kernel counts one byte per value. The zero fraction counts exact zeros in the
    layer's float and integer variables of rank >= 2 (kernels and tables).
    """
    rows = []
    for layer in _flat_layers(model):
        weights = layer.weights
        if not weights:
            continue
        params = sum(int(np.prod(w.shape)) for w in weights)
        nbytes = sum(int(np.prod(w.shape)) * w.dtype.size for w in weights)
        matrices = [w.numpy() for w in weights if len(w.shape) >= 2]
        total = sum(m.size for m in matrices)
        zeros = sum(int(np.count_nonzero(m == 0)) for m in matrices)
        rows.append((layer.name, type(layer).__name__, params, nbytes,
                     zeros / total if total else 0.0))
    return rows


def _flat_layers(model):
    from tfcompress._keras import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _flat_layers(layer)
        else:
            yield layer


def _markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def inspect_keras(model, batch_size=32, seq_length=128):
    """Return a Markdown report of a Keras model: layers, totals and a memory estimate."""
    rows = layer_table(model)
    table = _markdown(
        ["layer", "type", "parameters", "bytes", "zeros"],
        [(n, t, f"{p:,}", _format_bytes(b), f"{z:.1%}") for n, t, p, b, z in rows])
    params = sum(r[2] for r in rows)
    nbytes = sum(r[3] for r in rows)
    parts = [f"# {model.name}", "", table, "",
             f"total: {params:,} parameters, {_format_bytes(nbytes)} of variables"]
    try:
        from tfcompress.memory import estimate
    except ImportError:
        estimate = None
    if estimate is not None and isinstance(model.input, dict) and "input_word_ids" in model.input:
        result = estimate(model, batch_size=batch_size, seq_length=seq_length)
        parts += ["", f"training memory estimate (batch {batch_size}, sequence {seq_length}):",
                  "", result.to_markdown()]
    return "\n".join(parts)


def inspect_tflite(path):
    """Return a Markdown report of a TFLite file: operators and constant tensors by size."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    details = interpreter.get_tensor_details()
    ops = {}
    for op in interpreter._get_ops_details():
        ops[op["op_name"]] = ops.get(op["op_name"], 0) + 1
    constants = []
    for tensor in details:
        try:
            value = interpreter.get_tensor(tensor["index"])
        except ValueError:
            continue
        if value is None or value.size == 0 or len(value.shape) < 2:
            continue
        constants.append((tensor["name"], str(np.dtype(tensor["dtype"]).name),
                          "x".join(str(d) for d in value.shape), value.nbytes,
                          float(np.mean(value == 0))))
    constants.sort(key=lambda r: -r[3])
    size = os.path.getsize(path)
    parts = [f"# {os.path.basename(path)}", "", f"file size: {size:,} bytes ({_format_bytes(size)})",
             "", "operators: " + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())), "",
             _markdown(["tensor", "dtype", "shape", "bytes", "zeros"],
                       [(n, d, s, f"{b:,}", f"{z:.1%}") for n, d, s, b, z in constants[:40]])]
    if len(constants) > 40:
        parts.append(f"({len(constants) - 40} smaller tensors not shown)")
    return "\n".join(parts)


def model_kind(path):
    """Return "tflite", "keras" (a .keras or .h5 file) or "savedmodel" for a model path.

    Raises:
      FileNotFoundError: nothing exists at ``path``.
      ValueError: ``path`` is not one of those three kinds.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"model not found: {path!r}.")
    if os.path.isfile(path) and path.endswith(".tflite"):
        return "tflite"
    if os.path.isfile(path) and path.endswith((".keras", ".h5")):
        return "keras"
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "saved_model.pb")):
        return "savedmodel"
    raise ValueError(
        f"cannot read a model from {path!r}: expected a .tflite file, a .keras file or a "
        "SavedModel folder (one that contains saved_model.pb)."
    )


def load_keras_model(path):
    """Load a .keras file or a Keras SavedModel folder without compiling it.

    Raises:
      FileNotFoundError, ValueError: as ``model_kind``, and ValueError for a .tflite file.
    """
    if model_kind(path) == "tflite":
        raise ValueError(f"{path!r} is a TFLite file; this step needs a Keras model (a "
                         ".keras file or a SavedModel folder).")
    import tfcompress  # noqa: F401  (registers the custom layers before loading)
    from tfcompress._keras import keras

    return keras.models.load_model(path, compile=False)


def inspect_path(path, batch_size=32, seq_length=128):
    """Inspect a .tflite file, a .keras file or a SavedModel folder; return Markdown."""
    if model_kind(path) == "tflite":
        return inspect_tflite(path)
    model = load_keras_model(path)
    return inspect_keras(model, batch_size=batch_size, seq_length=seq_length)
