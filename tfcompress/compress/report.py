"""Per-layer results of compress(), counted from the weights of the models."""

import dataclasses
import json

import numpy as np

from tfcompress._keras import tf


def count_parameters(layer):
    """Stored parameters of a layer; kernel-transform state (masks, ranges) excluded."""
    from tfcompress.layers import parameter_count

    return parameter_count(layer)


def count_bytes(layer):
    """Bytes of the weights the layer keeps for inference (training-only state excluded)."""
    from tfcompress.layers import compressed_bytes

    return compressed_bytes(layer)


def kernel_sparsity(layer):
    """Return ``{kernel name: fraction of exact zeros}`` of the kernels a layer multiplies with.

    For a tfcompress kernel layer the effective kernel (after masks and other transforms,
    inference mode) is measured, for a layer that stores only nonzeros its dense view,
    and for a keras layer its ``kernel`` or ``embeddings`` weight.
    """
    if hasattr(layer, "effective_kernel") and hasattr(layer, "kernel_names"):
        result = {}
        for name in layer.kernel_names:
            value = np.asarray(layer.effective_kernel(name, training=False))
            result[name] = float(np.mean(value == 0))
        return result
    if callable(getattr(layer, "dense_kernel", None)):
        # Only nonzeros are stored, so the zeros are counted in the dense view.
        value = np.asarray(layer.dense_kernel())
        return {"kernel": float(np.mean(value == 0))}
    for attribute in ("kernel", "embeddings"):
        variable = getattr(layer, attribute, None)
        if isinstance(variable, tf.Variable):
            return {attribute: float(np.mean(variable.numpy() == 0))}
    return {}


@dataclasses.dataclass
class LayerReport:
    """One compressed layer.

    Attributes:
      name: layer name in the compressed model.
      actions: what was applied, in order, for example ``["low_rank(rank=8)"]``.
      source_type, new_type: class names before and after.
      params_before, params_after: stored parameters counted from the weights.
      bytes_before, bytes_after: bytes of the inference weights.
      sparsity: ``{kernel name: fraction of exact zeros}`` after compression.
      rank: rank of a low-rank layer, else None.
      error: relative L2 error of the layer output on calibration inputs,
        ``||f_new(x) - f(x)|| / ||f(x)||``, or None without calibration data.
      notes: remarks, for example that a LayerNormalization was kept in float32.
    """

    name: str
    actions: list
    source_type: str
    new_type: str
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    sparsity: dict
    rank: int = None
    error: float = None
    notes: list = dataclasses.field(default_factory=list)


class CompressionReport:
    """Per-layer results of ``compress`` plus model totals.

    Attributes:
      layers: list of ``LayerReport`` in model order.
      structured: list of dicts, one per structured step (heads, neurons or blocks
        removed), with the parameter counts of the whole model before and after.
      unreachable: list of dicts ``{name, reason, rules}`` for layers a rule selected
        but that could not be replaced.
      params_before, params_after, bytes_before, bytes_after: totals over every layer of
        the source and the compressed model.
    """

    def __init__(self, layers, structured, unreachable, params_before, params_after,
                 bytes_before, bytes_after):
        self.layers = list(layers)
        self.structured = list(structured)
        self.unreachable = list(unreachable)
        self.params_before = int(params_before)
        self.params_after = int(params_after)
        self.bytes_before = int(bytes_before)
        self.bytes_after = int(bytes_after)

    def __getitem__(self, name):
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no compressed layer named {name!r}; compressed layers: "
                       f"{[layer.name for layer in self.layers]}.")

    def to_dict(self):
        """Return the report as plain JSON-serializable Python values."""
        result = {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "structured": self.structured,
            "unreachable": self.unreachable,
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
        }
        # A JSON round trip turns numpy scalars into Python numbers.
        return json.loads(json.dumps(result, default=_to_builtin))

    def to_markdown(self):
        """Return the report as a Markdown table with a totals line."""
        lines = [
            "| layer | actions | params before | params after | bytes before | bytes after "
            "| sparsity | rank | rel. error | notes |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for layer in self.layers:
            sparsity = ", ".join(f"{k} {v:.1%}" for k, v in layer.sparsity.items())
            error = "" if layer.error is None else f"{layer.error:.4f}"
            rank = "" if layer.rank is None else str(layer.rank)
            lines.append(
                f"| {layer.name} | {'; '.join(layer.actions)} | {layer.params_before} | "
                f"{layer.params_after} | {layer.bytes_before} | {layer.bytes_after} | "
                f"{sparsity} | {rank} | {error} | {'; '.join(layer.notes)} |")
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else float("nan")
        lines.append("")
        lines.append(f"Total: {self.params_before} -> {self.params_after} parameters, "
                     f"{self.bytes_before} -> {self.bytes_after} bytes ({ratio:.1%}).")
        for step in self.structured:
            lines.append(f"Structured: {step['action']} {step['removed']} "
                         f"({step['params_before']} -> {step['params_after']} parameters).")
        for item in self.unreachable:
            lines.append(f"Not compressed: {item['name']}: {item['reason']}.")
        return "\n".join(lines)

    def __repr__(self):
        return (f"CompressionReport({len(self.layers)} layers, {self.params_before} -> "
                f"{self.params_after} parameters, {self.bytes_before} -> {self.bytes_after} "
                "bytes)")


def _to_builtin(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialize {type(value).__name__} in a report.")


def relative_error(reference, approximation):
    """Return ``||approximation - reference|| / ||reference||`` over all elements."""
    reference = np.concatenate([np.ravel(np.asarray(r, np.float64))
                                for r in tf.nest.flatten(reference)])
    approximation = np.concatenate([np.ravel(np.asarray(a, np.float64))
                                    for a in tf.nest.flatten(approximation)])
    norm = np.linalg.norm(reference)
    difference = np.linalg.norm(approximation - reference)
    return float(difference / norm) if norm > 0 else float(difference)
