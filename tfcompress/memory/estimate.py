"""Training-memory estimate of a Keras model: weights, gradients, optimizer slots, activations.

Counting rules (bytes):
  weights     every variable, elements times its dtype size (float32 under mixed policies).
  gradients   one per trainable variable, in the variable's dtype.
  slots       per trainable variable: adam/adamw 2 (m and v), momentum 1, sgd 0.
  activations every layer output at this batch and sequence length, times the layer's
              compute dtype size (2 under mixed policies except the float32 islands of
              ``tfcompress.train.precision``), plus one float32 [batch, heads, seq, seq]
              score tensor per ``AttentionCore``. With recompute, the outputs of the
              transformer blocks' layers are replaced by each block's input and the
              largest single block's activations.

It is an estimate: it ignores the runtime's workspace, temporary tensors freed inside a
layer and allocator rounding, so a measured peak differs from it (see ``measure``).
"""

import dataclasses

import numpy as np

from tfcompress._keras import check_model, keras, tf
from tfcompress.train.blocks import block_index
from tfcompress.train.precision import PRECISIONS, check_precision, keeps_float32

OPTIMIZER_SLOTS = {"adamw": 2, "adam": 2, "momentum": 1, "sgd": 0}


@dataclasses.dataclass
class MemoryEstimate:
    """Estimated training memory in bytes, with the settings it was computed for."""

    weights: int
    gradients: int
    optimizer_slots: int
    activations: int
    batch_size: int
    seq_length: int
    precision: str
    optimizer: str
    recompute: bool

    @property
    def total(self):
        return self.weights + self.gradients + self.optimizer_slots + self.activations

    def rows(self):
        return [("weights", self.weights), ("gradients", self.gradients),
                ("optimizer slots", self.optimizer_slots), ("activations", self.activations),
                ("total", self.total)]

    def to_markdown(self):
        """Return a Markdown table of the parts in bytes and MiB."""
        lines = [f"Training memory, batch {self.batch_size}, sequence {self.seq_length}, "
                 f"{self.precision}, {self.optimizer}"
                 f"{', recompute' if self.recompute else ''} (estimate)", "",
                 "| part | bytes | MiB |", "|---|---:|---:|"]
        lines += [f"| {name} | {value} | {value / 2**20:.2f} |" for name, value in self.rows()]
        return "\n".join(lines)


@dataclasses.dataclass
class MemoryComparison:
    """Estimates of one model under several settings, keyed by a label."""

    estimates: dict

    def to_markdown(self):
        """Return a Markdown table with one column per setting, in MiB."""
        labels = list(self.estimates)
        lines = ["| part | " + " | ".join(labels) + " |",
                 "|---|" + "---:|" * len(labels)]
        parts = [name for name, _ in next(iter(self.estimates.values())).rows()]
        for index, name in enumerate(parts):
            cells = [f"{e.rows()[index][1] / 2**20:.2f} MiB" for e in self.estimates.values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _variable_bytes(variables):
    return sum(int(np.prod(v.shape)) * v.dtype.size for v in variables)


def _concrete(shape, batch_size, seq_length):
    # The first dimension is the batch; any other unknown one is the sequence.
    dims = [batch_size if i == 0 else (seq_length if d is None else d)
            for i, d in enumerate(shape)]
    return int(np.prod(dims))


def _walk(model):
    """Yield (layer, node) for every call of a layer inside ``model``, nested models opened.

    Only the model's own nodes count: a layer shared with another model (a block
    sub-model, a recompute wrapper) has further nodes that are not part of this step.
    """
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            layer = node.layer
            if node.is_input or isinstance(layer, keras.layers.InputLayer):
                continue
            if isinstance(layer, keras.Model) and getattr(layer, "_is_graph_network", False):
                yield from _walk(layer)
            else:
                yield layer, node


def _node_activation_bytes(model_config_outputs, layer, node, batch_size, seq_length,
                           precision):
    config = {"class_name": type(layer).__name__, "config": {"name": layer.name}}
    if precision == "float32" or keeps_float32(config, model_config_outputs):
        size = 4
    else:
        size = 2
    total = 0
    for tensor in tf.nest.flatten(node.outputs):
        total += _concrete(tensor.shape, batch_size, seq_length) * (
            size if tensor.dtype.is_floating else tensor.dtype.size)
    if type(layer).__name__ == "AttentionCore":
        total += batch_size * layer.num_heads * seq_length * seq_length * 4
    return total


def estimate(model, batch_size, seq_length, precision="float32", optimizer="adamw",
             recompute=False):
    """Estimate the memory of one training step of ``model``.

    Args:
      model: a built functional tf_keras model.
      batch_size: examples per step.
      seq_length: tokens per example, used for every unknown non-batch dimension.
      precision: "float32", "mixed_float16" or "mixed_bfloat16"; the compute dtype of
        the activations. Weights are counted in their stored dtype.
      optimizer: "adamw", "adam", "momentum" or "sgd"; decides the slots per variable.
      recompute: count activations as ``tfcompress.train.recompute_model`` keeps them.

    Returns:
      A ``MemoryEstimate``.
    """
    check_model(model)
    check_precision(precision)
    if optimizer not in OPTIMIZER_SLOTS:
        raise ValueError(
            f"optimizer must be one of {sorted(OPTIMIZER_SLOTS)}; received {optimizer!r}.")
    for name, value in (("batch_size", batch_size), ("seq_length", seq_length)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; received {value!r}.")

    trainable = _variable_bytes(model.trainable_weights)
    outputs = {t.node.layer.name for t in tf.nest.flatten(model.output)
               if hasattr(t, "node")}
    outside, per_block, block_inputs = 0, {}, {}
    if not getattr(model, "_is_graph_network", False):
        raise ValueError(
            f"model {model.name!r} is a subclassed {type(model).__name__}; the estimate reads "
            "layer output shapes from a functional graph. Pass a functional model.")
    for layer, node in _walk(model):
        size = _node_activation_bytes(outputs, layer, node, batch_size, seq_length, precision)
        index = block_index(layer.name)
        if index is None:
            outside += size
        else:
            per_block[index] = per_block.get(index, 0) + size
    if recompute and per_block:
        hidden = _block_input_bytes(model, batch_size, seq_length)
        activations = outside + len(per_block) * hidden + max(per_block.values())
    else:
        activations = outside + sum(per_block.values())

    return MemoryEstimate(
        weights=_variable_bytes(model.weights), gradients=trainable,
        optimizer_slots=trainable * OPTIMIZER_SLOTS[optimizer], activations=activations,
        batch_size=batch_size, seq_length=seq_length, precision=precision,
        optimizer=optimizer, recompute=recompute)


def _block_input_bytes(model, batch_size, seq_length):
    from tfcompress.train.blocks import extract_blocks

    hidden = extract_blocks(model)[0].hidden
    # Block inputs are LayerNorm outputs, float32 under every policy.
    return _concrete(hidden.shape, batch_size, seq_length) * 4


def compare(model, batch_size, seq_length, optimizer="adamw"):
    """Estimate ``model`` under float32, mixed_float16 and mixed_float16 with recompute."""
    settings = {"float32": ("float32", False), "mixed_float16": ("mixed_float16", False),
                "mixed_float16 + recompute": ("mixed_float16", True)}
    return MemoryComparison({
        label: estimate(model, batch_size, seq_length, precision, optimizer, recompute)
        for label, (precision, recompute) in settings.items()})


__all__ = ["MemoryComparison", "MemoryEstimate", "OPTIMIZER_SLOTS", "PRECISIONS", "compare",
           "estimate"]
