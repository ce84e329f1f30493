"""Transformer blocks of a flat tfcompress encoder as their own Keras models.

The encoder is one flat functional graph whose block ``i`` is the set of layers named
``transformer/layer_{i}/...``. A block reads two tensors from outside (the previous
block's output and the input mask) and writes one tensor that the rest of the graph
reads. ``extract_block`` replays a block's layers on fresh inputs, so the returned
sub-model shares its layers (and weights) with the original model, whatever layer
types compression put into the block. ``replace_blocks`` rebuilds the whole model with
each block replaced by a layer of the caller's choice.

Keras has no public API to walk the nodes of a functional model, so this module reads
``Functional._nodes_by_depth`` and ``Node.call_args`` of tf_keras 2.21.
"""

import dataclasses
import re

from tfcompress._keras import keras, tf
from tf_keras.src.engine.keras_tensor import KerasTensor

_BLOCK_PATTERN = re.compile(r"^transformer/layer_(\d+)/")


@dataclasses.dataclass
class Block:
    """One transformer block of a functional model.

    Attributes:
      index: the block number ``i`` of ``transformer/layer_{i}``.
      model: a functional model ``[hidden, mask] -> output`` sharing the block's layers.
      hidden: the original model's tensor that feeds the block.
      mask: the original model's mask tensor that the block reads.
      output: the original model's tensor that the block produces.
    """

    index: int
    model: keras.Model
    hidden: KerasTensor
    mask: KerasTensor
    output: KerasTensor


def _nodes(model):
    """Yield the model's call nodes in an order where producers come first."""
    if not getattr(model, "_is_graph_network", False):
        raise ValueError(
            f"model {model.name!r} is a subclassed {type(model).__name__}; splitting it "
            "into transformer blocks needs a functional model such as the ones "
            "tfcompress.bert.build_encoder and tfcompress.bert.classifier return."
        )
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if not node.is_input:
                yield node


def block_index(layer_name):
    """Return the block number of a layer name, or None outside the transformer blocks."""
    match = _BLOCK_PATTERN.match(layer_name)
    return int(match.group(1)) if match else None


def _replay(nodes, mapping):
    """Call each node's layer again on the tensors that ``mapping`` substitutes."""
    def substitute(value):
        if isinstance(value, KerasTensor):
            return mapping.get(id(value), value)
        return value

    for node in nodes:
        args, kwargs = tf.nest.map_structure(substitute, (node.call_args, node.call_kwargs))
        outputs = node.layer(*args, **kwargs)
        for old, new in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(outputs)):
            mapping[id(old)] = new


def _block_nodes(model):
    nodes = list(_nodes(model))
    by_block = {}
    for node in nodes:
        index = block_index(node.layer.name)
        if index is not None:
            by_block.setdefault(index, []).append(node)
    if not by_block:
        raise ValueError(
            f"model {model.name!r} has no layers named 'transformer/layer_<i>/...' at its "
            "top level. Pass a flat tfcompress encoder or classifier; a model that nests "
            "the encoder as one layer must be rebuilt with tfcompress.bert.classifier."
        )
    return nodes, by_block


def _block_boundary(model, nodes, index, block_nodes):
    """Return the (hidden, mask, output) tensors where block ``index`` meets the graph."""
    produced = {id(t) for node in block_nodes for t in tf.nest.flatten(node.outputs)}
    external = {}
    for node in block_nodes:
        for tensor in node.keras_inputs:
            if id(tensor) not in produced:
                external[id(tensor)] = tensor
    floats = [t for t in external.values() if t.dtype.is_floating]
    masks = [t for t in external.values() if not t.dtype.is_floating]
    if len(floats) != 1 or len(masks) != 1:
        raise ValueError(
            f"block transformer/layer_{index} of model {model.name!r} must read exactly "
            "one hidden-state tensor and one mask tensor from outside the block; it reads "
            f"{[t.name for t in external.values()]}."
        )

    block_ids = {id(node) for node in block_nodes}
    consumed_outside = {}
    for node in nodes:
        if id(node) in block_ids:
            continue
        for tensor in node.keras_inputs:
            if id(tensor) in produced:
                consumed_outside[id(tensor)] = tensor
    for tensor in tf.nest.flatten(model.output):
        if id(tensor) in produced:
            consumed_outside[id(tensor)] = tensor
    if len(consumed_outside) != 1:
        raise ValueError(
            f"block transformer/layer_{index} of model {model.name!r} must pass exactly one "
            f"tensor to the rest of the model; it passes {len(consumed_outside)}."
        )
    return floats[0], masks[0], next(iter(consumed_outside.values()))


def extract_blocks(model):
    """Return every transformer block of ``model`` as a ``Block``, in order.

    Args:
      model: a functional tf_keras model with layers named ``transformer/layer_{i}/...``.

    Returns:
      A list of ``Block``; ``block.model`` maps ``[hidden, mask]`` to the block output
      with the same layer objects as ``model``, so training it trains ``model``.
    """
    nodes, by_block = _block_nodes(model)
    blocks = []
    for index in sorted(by_block):
        hidden, mask, output = _block_boundary(model, nodes, index, by_block[index])
        hidden_input = keras.Input(shape=hidden.shape[1:], dtype=hidden.dtype,
                                   name=f"layer_{index}_hidden")
        mask_input = keras.Input(shape=mask.shape[1:], dtype=mask.dtype,
                                 name=f"layer_{index}_mask")
        mapping = {id(hidden): hidden_input, id(mask): mask_input}
        _replay(by_block[index], mapping)
        block_model = keras.Model([hidden_input, mask_input], mapping[id(output)],
                                  name=f"transformer_layer_{index}")
        blocks.append(Block(index, block_model, hidden, mask, output))
    return blocks


def replace_blocks(model, make_layer):
    """Rebuild ``model`` with each transformer block replaced by ``make_layer(block)``.

    ``make_layer`` receives a ``Block`` and returns a layer called on ``[hidden, mask]``.
    Layers outside the blocks are reused, so the new model shares their weights.
    """
    nodes, by_block = _block_nodes(model)
    blocks = {block.index: block for block in extract_blocks(model)}
    layer_of_block = {}
    mapping = {}
    for node in nodes:
        index = block_index(node.layer.name)
        if index is None:
            _replay([node], mapping)
            continue
        if index in layer_of_block:
            continue
        block = blocks[index]
        layer_of_block[index] = make_layer(block)
        hidden = mapping.get(id(block.hidden), block.hidden)
        mask = mapping.get(id(block.mask), block.mask)
        mapping[id(block.output)] = layer_of_block[index]([hidden, mask])

    outputs = tf.nest.map_structure(lambda t: mapping.get(id(t), t), model.output)
    return keras.Model(model.input, outputs, name=model.name)
