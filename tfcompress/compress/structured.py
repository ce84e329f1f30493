"""Structured pruning of a tfcompress BERT encoder: remove heads, FFN neurons, blocks.

Unlike masks, these functions shrink the shapes. They read the encoder's config from
its layers (``tfcompress.bert.encoder_config``), build a smaller encoder with
``BertConfig(layer_heads=..., layer_intermediate_sizes=..., num_layers=...)``, and copy
the kept slices of every weight. A classifier made by ``tfcompress.bert.classifier`` is
rebuilt on top of the smaller encoder with the same head.

Importance scores, higher meaning more important:

- ``"weight"``: the L2 norm of all weights that belong to the unit. For head h these are
  the query, key and value kernel columns and biases of h and the attention-output
  kernel rows of h. For FFN neuron j they are column j and bias j of the intermediate
  kernel and row j of the FFN output kernel.
- ``"gradient"``: the first-order Taylor criterion of Molchanov et al., "Importance
  Estimation for Neural Network Pruning" (CVPR 2019): sum over those weights and over
  the calibration batches of |dL/dw * w|, an estimate of how much the loss changes
  when the unit is removed. L is the sparse categorical cross-entropy of the logits when
  the calibration data has labels and the model returns [batch, classes] logits. In any
  other case L is the mean of 0.5 * y^2 over every float output y, a label-free proxy
  that measures how strongly each unit drives the outputs.
"""

import logging
import re

import numpy as np

from tfcompress._keras import check_model, keras, tf
from tfcompress.bert import BertConfig, build_encoder, classifier, encoder_config
from tfcompress.compress.calibration import iterate_batches

logger = logging.getLogger(__name__)

_BLOCK = re.compile(r"^transformer/layer_(\d+)/")
IMPORTANCE_METHODS = ("weight", "gradient")


def block_index(name):
    """Return the block index in a layer name like ``transformer/layer_3/...``, or None."""
    found = _BLOCK.match(name)
    return int(found.group(1)) if found else None


class EncoderParts:
    """Layers and config of a tfcompress encoder or classifier, checked for a rebuild.

    Raises ValueError for a model that is not a tfcompress encoder, and TypeError when a
    projection is no longer a plain Dense (the model was compressed already).
    """

    def __init__(self, model):
        check_model(model)
        self.model = model
        self.layers = {layer.name: layer for layer in model.layers}
        self.config = encoder_config(model)
        self.is_classifier = "classifier/logits" in self.layers
        for i in range(self.config.num_layers):
            for part in ("attention/query", "attention/key", "attention/value",
                         "attention/output", "ffn/intermediate", "ffn/output"):
                name = f"transformer/layer_{i}/{part}"
                layer = self.layers.get(name)
                if type(layer) is not keras.layers.Dense:
                    raise TypeError(
                        f"structured pruning needs plain Dense projections, but {name!r} is "
                        f"{type(layer).__name__}. Remove heads, neurons or layers before "
                        "other compression (compress() applies structured rules first).")

    def dense(self, block, part):
        return self.layers[f"transformer/layer_{block}/{part}"]

    def rebuild(self, config, slice_weights):
        """Build the model for ``config`` and fill it with ``slice_weights(name, weights)``."""
        if self.is_classifier:
            encoder = build_encoder(config)
            logits = self.layers["classifier/logits"]
            pooling = "mean" if "classifier/mean_pooling" in self.layers else "pooled"
            dropout = self.layers["classifier/dropout"].rate
            new_model = classifier(encoder, int(logits.units), dropout=dropout,
                                   pooling=pooling, name=self.model.name)
        else:
            new_model = build_encoder(config, name=self.model.name)
        for layer in new_model.layers:
            if not layer.weights:
                continue
            weights = slice_weights(layer.name)
            layer.set_weights(weights)
        return new_model

    def head_columns(self, block, heads):
        size = self.config.attention_head_size
        return np.concatenate([np.arange(h * size, (h + 1) * size) for h in heads])


def _num_heads(encoder, block):
    return encoder.layers[f"transformer/layer_{block}/attention/core"].num_heads


def _unit_weights(encoder, block, kind):
    """Yield ``(variable, axis, group size)``: the weights split into units along axis."""
    if kind == "heads":
        size = encoder.config.attention_head_size
        for part in ("attention/query", "attention/key", "attention/value"):
            layer = encoder.dense(block, part)
            yield layer.kernel, 1, size
            yield layer.bias, 0, size
        yield encoder.dense(block, "attention/output").kernel, 0, size
    else:
        layer = encoder.dense(block, "ffn/intermediate")
        yield layer.kernel, 1, 1
        yield layer.bias, 0, 1
        yield encoder.dense(block, "ffn/output").kernel, 0, 1


def _per_unit_sum(values, axis, size):
    """Sum |values| over everything but ``axis``, then over groups of ``size`` units."""
    values = np.moveaxis(np.asarray(values, np.float64), axis, 0)
    per_index = values.reshape(values.shape[0], -1).sum(axis=1)
    return per_index.reshape(-1, size).sum(axis=1)


def _loss(model, outputs, labels):
    if labels is not None and isinstance(outputs, tf.Tensor) and outputs.shape.rank == 2:
        return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            labels, tf.cast(outputs, tf.float32), from_logits=True))
    terms = [tf.reduce_mean(0.5 * tf.square(tf.cast(y, tf.float32)))
             for y in tf.nest.flatten(outputs) if y.dtype.is_floating]
    return tf.add_n(terms)


def unit_importance(model, kind, method, calibration_data):
    """Return ``{block: scores}`` for ``kind`` "heads" or "neurons" (module docstring)."""
    if method not in IMPORTANCE_METHODS:
        raise ValueError(f"importance must be one of {list(IMPORTANCE_METHODS)}; received "
                         f"{method!r}.")
    if method == "gradient" and calibration_data is None:
        raise ValueError("importance='gradient' needs calibration_data to compute gradients; "
                         "pass calibration_data or use importance='weight'.")
    encoder = EncoderParts(model)
    blocks = range(encoder.config.num_layers)
    parts = {b: list(_unit_weights(encoder, b, kind)) for b in blocks}

    if method == "weight":
        return {b: np.sqrt(sum(_per_unit_sum(np.square(v.numpy()), axis, size)
                               for v, axis, size in parts[b])) for b in blocks}

    variables = [v for b in blocks for v, _, _ in parts[b]]
    totals = [np.zeros(v.shape, np.float64) for v in variables]
    for inputs, labels in iterate_batches(calibration_data):
        with tf.GradientTape() as tape:
            loss = _loss(model, model(inputs, training=False), labels)
        gradients = tape.gradient(loss, variables)
        for total, gradient, variable in zip(totals, gradients, variables):
            total += np.abs(np.asarray(gradient, np.float64) * variable.numpy())
    scores, position = {}, 0
    for b in blocks:
        score = 0.0
        for _, axis, size in parts[b]:
            score = score + _per_unit_sum(totals[position], axis, size)
            position += 1
        scores[b] = score
    return scores


def head_importance(model, method="weight", calibration_data=None):
    """Score every attention head of a tfcompress encoder or classifier.

    Args:
      model: a model built by ``tfcompress.bert.build_encoder`` (or loaded through
        tfcompress.bert), or a ``tfcompress.bert.classifier`` on one.
      method: ``"weight"`` (L2 norm of the head's weights) or ``"gradient"`` (Taylor
        criterion on ``calibration_data``); see the module docstring.
      calibration_data: model inputs, or (inputs, labels) pairs, for ``"gradient"``.

    Returns:
      Dict from block index to a float64 array [heads] of scores.
    """
    return unit_importance(model, "heads", method, calibration_data)


def neuron_importance(model, method="weight", calibration_data=None):
    """Score every FFN intermediate neuron; arguments as in ``head_importance``.

    Returns:
      Dict from block index to a float64 array [intermediate size] of scores.
    """
    return unit_importance(model, "neurons", method, calibration_data)


def _normalize_removal(encoder, removal, kind):
    """Turn ``{block or layer name: [unit indices]}`` into ``{block: sorted unit indices}``."""
    if not isinstance(removal, dict):
        raise TypeError(f"{kind} must be a dict from block index (or layer name) to a list "
                        f"of indices; received {type(removal).__name__}.")
    result = {}
    for key, indices in removal.items():
        block = key if isinstance(key, int) else block_index(str(key))
        if block is None or not 0 <= block < encoder.config.num_layers:
            raise ValueError(f"{kind} key {key!r} is not a block of this encoder; use an "
                             f"index in [0, {encoder.config.num_layers - 1}] or a layer name "
                             "like 'transformer/layer_0/attention/core'.")
        total = (_num_heads(encoder, block) if kind == "heads"
                 else int(encoder.dense(block, "ffn/intermediate").units))
        indices = sorted(set(int(i) for i in indices))
        bad = [i for i in indices if not 0 <= i < total]
        if bad:
            raise ValueError(f"block {block} has {total} {kind}; indices {bad} are out of "
                             f"range [0, {total - 1}].")
        if len(indices) >= total:
            what = "heads" if kind == "heads" else "FFN neurons"
            raise ValueError(f"cannot remove all {total} {what} of block {block}; keep at "
                             "least one, or remove the whole block with remove_layers.")
        result[block] = sorted(set(result.get(block, [])) | set(indices))
    return result


def least_important(scores, blocks, fraction, count, kind):
    """Return ``{block: sorted indices}`` of the lowest-scored units to remove per block."""
    removal = {}
    for block in blocks:
        total = len(scores[block])
        amount = count if count is not None else int(round(fraction * total))
        if amount >= total:
            raise ValueError(f"removing {amount} of the {total} {kind} of block {block} "
                             "leaves none; lower the fraction or count, or use remove_layers.")
        if amount:
            # A stable sort keeps the lower index when two scores tie, so results repeat.
            removal[block] = sorted(np.argsort(scores[block], kind="stable")[:amount].tolist())
    return removal


def _resolve_removal(model, explicit, fraction, count, importance, calibration_data,
                     blocks, kind):
    encoder = EncoderParts(model)
    chosen = [name for name, value in (("an explicit dict", explicit), ("fraction", fraction),
                                       ("count", count)) if value is not None]
    if len(chosen) != 1:
        raise ValueError(f"pass exactly one of an explicit {kind} dict, fraction or count; "
                         f"received {chosen or 'none'}.")
    if explicit is not None:
        return encoder, _normalize_removal(encoder, explicit, kind)
    if fraction is not None and not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1); received {fraction!r}.")
    if count is not None and (not isinstance(count, int) or count < 1):
        raise ValueError(f"count must be a positive integer; received {count!r}.")
    blocks = range(encoder.config.num_layers) if blocks is None else sorted(set(blocks))
    scores = unit_importance(model, kind, importance, calibration_data)
    return encoder, least_important(scores, blocks, fraction, count, kind)


def remove_heads(model, heads=None, *, fraction=None, count=None, importance="weight",
                 calibration_data=None, blocks=None):
    """Return a copy of ``model`` whose attention blocks have fewer heads.

    Args:
      model: a tfcompress encoder, or a classifier built on one.
      heads: ``{block index or layer name: [head indices to remove]}``.
      fraction: instead of ``heads``, remove ``round(fraction * heads)`` heads of each
        block in ``blocks``, the least important first.
      count: instead of ``heads``, remove this many heads from each block in ``blocks``.
      importance: ``"weight"`` or ``"gradient"``, the score used with fraction or count.
      calibration_data: model inputs (or (inputs, labels)) for ``"gradient"``.
      blocks: block indices that fraction or count applies to; all blocks by default.

    Returns:
      A new model of the same kind; ``model`` is not modified.
    """
    encoder, removal = _resolve_removal(model, heads, fraction, count, importance,
                                        calibration_data, blocks, "heads")
    config = encoder.config
    kept = {}
    for block in range(config.num_layers):
        total = _num_heads(encoder, block)
        kept[block] = [h for h in range(total) if h not in removal.get(block, ())]
    logger.info("removing heads %s from %r", removal, model.name)

    new_config = BertConfig(**{**config.to_dict(), "head_size": config.attention_head_size,
                               "layer_heads": [len(kept[b]) for b in kept]})

    def slice_weights(name):
        weights = encoder.layers[name].get_weights()
        block = block_index(name)
        if block is None or block not in removal:
            return weights
        columns = encoder.head_columns(block, kept[block])
        if name.endswith(("/attention/query", "/attention/key", "/attention/value")):
            return [weights[0][:, columns], weights[1][columns]]
        if name.endswith("/attention/output"):
            return [weights[0][columns, :], weights[1]]
        return weights

    return encoder.rebuild(new_config, slice_weights)


def remove_neurons(model, neurons=None, *, fraction=None, count=None, importance="weight",
                   calibration_data=None, blocks=None):
    """Return a copy of ``model`` whose FFN layers have fewer intermediate neurons.

    Arguments as in ``remove_heads``, with ``neurons`` as
    ``{block index or layer name: [neuron indices to remove]}``.
    """
    encoder, removal = _resolve_removal(model, neurons, fraction, count, importance,
                                        calibration_data, blocks, "neurons")
    config = encoder.config
    kept = {}
    for block in range(config.num_layers):
        total = int(encoder.dense(block, "ffn/intermediate").units)
        removed = set(removal.get(block, ()))
        kept[block] = np.array([j for j in range(total) if j not in removed])
    logger.info("removing FFN neurons from %r: %s", model.name,
                {b: len(v) for b, v in removal.items()})

    new_config = BertConfig(**{**config.to_dict(),
                               "layer_intermediate_sizes": [len(kept[b]) for b in kept]})

    def slice_weights(name):
        weights = encoder.layers[name].get_weights()
        block = block_index(name)
        if block is None or block not in removal:
            return weights
        if name.endswith("/ffn/intermediate"):
            return [weights[0][:, kept[block]], weights[1][kept[block]]]
        if name.endswith("/ffn/output"):
            return [weights[0][kept[block], :], weights[1]]
        return weights

    return encoder.rebuild(new_config, slice_weights)


def remove_layers(model, indices):
    """Return a copy of ``model`` without the transformer blocks at ``indices``.

    The kept blocks are renumbered from 0 in their original order, so
    ``transformer/layer_3`` of a 4-block encoder becomes ``transformer/layer_2`` after
    removing block 1.
    """
    encoder = EncoderParts(model)
    config = encoder.config
    if (not isinstance(indices, (list, tuple)) or not indices
            or not all(isinstance(i, int) for i in indices)):
        raise ValueError(f"indices must be a non-empty list of block indices; received "
                         f"{indices!r}.")
    bad = sorted(i for i in set(indices) if not 0 <= i < config.num_layers)
    if bad:
        raise ValueError(f"block indices {bad} are out of range; this encoder has "
                         f"{config.num_layers} blocks, [0, {config.num_layers - 1}].")
    kept = [i for i in range(config.num_layers) if i not in set(indices)]
    if not kept:
        raise ValueError(f"removing blocks {sorted(set(indices))} leaves no block; keep at "
                         "least one.")
    logger.info("removing blocks %s from %r", sorted(set(indices)), model.name)

    fields = config.to_dict()
    fields.update(num_layers=len(kept), head_size=config.attention_head_size,
                  layer_heads=[_num_heads(encoder, i) for i in kept],
                  layer_intermediate_sizes=[int(encoder.dense(i, "ffn/intermediate").units)
                                            for i in kept])
    new_config = BertConfig(**fields)

    def slice_weights(name):
        block = block_index(name)
        if block is not None:
            name = _BLOCK.sub(f"transformer/layer_{kept[block]}/", name)
        return encoder.layers[name].get_weights()

    return encoder.rebuild(new_config, slice_weights)
