"""compress(): apply a recipe to a tf_keras model by rebuilding its graph.

The steps, in order:

1. Check the model (tf_keras, no ``hub.KerasLayer``) and resolve the recipe against its
   layers: unknown names, conflicts and missing calibration data fail here, before any
   work.
2. Structured rules (remove_heads, remove_neurons, then remove_layers) rebuild a
   smaller tfcompress encoder. Later rules match the names of that smaller model, whose
   blocks are renumbered from 0 after remove_layers.
3. Every keras ``MultiHeadAttention`` that a rule selects is split into five layers of
   the same math: ``<name>/query``, ``<name>/key`` and ``<name>/value`` Dense layers
   (the EinsumDense kernels [in, heads, head_size] reshaped to [in, heads * head_size]),
   a ``tfcompress.bert.AttentionCore`` ``<name>/core`` and an ``<name>/output`` Dense.
   Each part is an ordinary top-level layer, so it can be compressed, probed for
   calibration, saved and reloaded like any other. The core needs a key mask, and an
   all-ones one is made with TF op layers, because a MultiHeadAttention called with
   an ``attention_mask``, a causal mask or Keras masks is not split (see
   ``graph.mha_unsupported_reason``).
4. Calibration inputs of every selected layer are captured from that float model.
5. The graph is rebuilt once more. Each selected layer is replaced by the output of the
   tfcompress.layers factories in the order low_rank, prune, quantize, sparse, and
   every other layer is copied with its weights, so the input model is never modified.

Layers inside a subclassed layer or a nested model cannot be replaced, because their
caller's ``call()`` would still use the originals; a rule that selects them gets a
warning and the report lists them under ``unreachable``.
"""

import inspect
import logging
import warnings

from tfcompress._keras import check_model, keras, tf
from tfcompress.compress import graph, structured
from tfcompress.compress.calibration import capture_layer_inputs, concatenate
from tfcompress.compress.recipe import LAYER_ACTIONS, Recipe, RecipeError
from tfcompress.compress.report import (CompressionReport, LayerReport, count_bytes,
                                        count_parameters, kernel_sparsity, relative_error)

logger = logging.getLogger(__name__)

_STRUCTURED_ORDER = ("remove_heads", "remove_neurons", "remove_layers")


def compress(model, recipe, calibration_data=None):
    """Return a compressed copy of ``model`` and a report of what changed.

    Args:
      model: a functional or Sequential tf_keras model (the tfcompress encoder and
        classifier included).
      recipe: a ``Recipe``, or a dict accepted by ``Recipe.from_dict``.
      calibration_data: optional model inputs: a ``tf.data.Dataset`` of inputs or
        ``(inputs, labels)``, a dict of arrays, an array or an ``(inputs, labels)``
        tuple. Needed by ``method: activation`` and ``importance: gradient``. When given,
        QAT ranges start from it and the report gives each layer's output error on it.

    Returns:
      ``(new_model, CompressionReport)``. ``model`` is not modified.

    Raises:
      RecipeError: the recipe does not fit the model (a rule selects nothing, two rules
        conflict, calibration data is missing).
      TypeError: the model is not a tf_keras functional or Sequential model, or
        contains a ``hub.KerasLayer``.
    """
    check_model(model)
    if isinstance(recipe, dict):
        recipe = Recipe.from_dict(recipe)
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a tfcompress Recipe or a dict; received "
                        f"{type(recipe).__name__}.")
    if not graph.is_graph_model(model):
        raise TypeError(
            f"model {model.name!r} is a subclassed Model (or a Sequential model without "
            "an input shape); compress needs a functional or built Sequential model.")

    plan = recipe.resolve(graph.layer_table(model))
    _check_calibration(recipe, calibration_data)
    if plan.structured:
        structured.EncoderParts(model)  # raises unless model is a tfcompress encoder/classifier

    # ---- structured pruning --------------------------------------------------------
    current = model
    structured_steps = []
    if plan.structured:
        current, structured_steps = _apply_structured(model, plan.structured,
                                                      calibration_data)
        plan = recipe.without_structured().resolve(graph.layer_table(current))

    if plan.unreachable:
        listing = "; ".join(f"{name!r}: {item['reason']}"
                            for name, item in plan.unreachable.items())
        warnings.warn(f"these selected layers were not compressed: {listing}.",
                      stacklevel=2)

    # ---- split MultiHeadAttention ----------------------------------------------------
    split = {name.rsplit("/", 1)[0] for name in plan.layers if "/" in name}
    split = {name for name in split if _is_mha(current, name)}
    if split:
        current = _split_attention(current, split)

    # ---- calibration inputs --------------------------------------------------------
    targets = [current.get_layer(name) for name in plan.layers]
    captured = {}
    if calibration_data is not None:
        captured = {name: concatenate(batches) for name, batches in
                    capture_layer_inputs(current, targets, calibration_data).items()}
    ranks = _budget_ranks(current, plan)

    # ---- replace selected layers ---------------------------------------------------
    reports = {}

    def replace_layer(layer):
        if layer.name not in plan.layers:
            return None
        new, report = _compress_layer(layer, plan.layers[layer.name],
                                      captured.get(layer.name), ranks)
        reports[layer.name] = report
        return new

    new_model, _ = graph.rebuild(current, replace_layer)
    report = CompressionReport(
        layers=[reports[name] for name in plan.layers if name in reports],
        structured=structured_steps,
        unreachable=[{"name": n, "reason": item["reason"], "rules": item["rules"]}
                     for n, item in plan.unreachable.items()],
        params_before=sum(count_parameters(layer) for layer in model.layers),
        params_after=sum(count_parameters(layer) for layer in new_model.layers),
        bytes_before=sum(count_bytes(layer) for layer in model.layers),
        bytes_after=sum(count_bytes(layer) for layer in new_model.layers),
    )
    logger.info("compressed %r: %s", model.name, report)
    return new_model, report


def _check_calibration(recipe, calibration_data):
    if calibration_data is not None:
        return
    for rule in recipe.rules:
        for action, arguments in rule.actions.items():
            if arguments.get("method") == "activation" or arguments.get("importance") == "gradient":
                key = "method" if "method" in arguments else "importance"
                raise RecipeError(
                    f"{rule.describe()}: {action}.{key}={arguments[key]!r} needs "
                    "calibration data; pass calibration_data to compress().")


def _is_mha(model, name):
    try:
        return isinstance(model.get_layer(name), keras.layers.MultiHeadAttention)
    except ValueError:
        return False


def _apply_structured(model, steps, calibration_data):
    """Run structured steps (heads, then neurons, then blocks) and describe each one."""
    ordered = sorted(steps, key=lambda step: _STRUCTURED_ORDER.index(step[1]))
    records = []
    current = model
    for rule, action, arguments, names in ordered:
        before = current.count_params()
        if action == "remove_layers":
            current = structured.remove_layers(current, list(arguments["indices"]))
            removed = list(arguments["indices"])
        else:
            blocks = sorted({b for b in map(structured.block_index, names) if b is not None})
            if not blocks:
                raise RecipeError(
                    f"{rule.describe()} selects no layer inside a transformer block "
                    f"(transformer/layer_<i>/...), so {action} has nothing to act on.")
            function = (structured.remove_heads if action == "remove_heads"
                        else structured.remove_neurons)
            kind = "heads" if action == "remove_heads" else "neurons"
            scores = structured.unit_importance(current, kind, arguments["importance"],
                                            calibration_data)
            removed = structured.least_important(
                scores, blocks, arguments.get("fraction"), arguments.get("count"), kind)
            current = function(current, removed)
        records.append({"action": action, "rule": rule.describe(),
                        "removed": {str(k): v for k, v in removed.items()}
                        if isinstance(removed, dict) else removed,
                        "params_before": int(before), "params_after": int(current.count_params())})
    return current, records


def _mha_parts(mha):
    """Build the five layers that replace a MultiHeadAttention, with its weights."""
    from tfcompress.bert import AttentionCore

    heads, size = mha._num_heads, mha._key_dim
    config = mha.get_config()
    common = {key: config[key] for key in (
        "use_bias", "kernel_initializer", "bias_initializer", "kernel_regularizer",
        "bias_regularizer", "kernel_constraint", "bias_constraint")}
    parts = {}
    for part, dense in (("query", mha._query_dense), ("key", mha._key_dense),
                        ("value", mha._value_dense)):
        kernel = dense.kernel.numpy()
        layer = keras.layers.Dense(heads * size, name=f"{mha.name}/{part}",
                                   dtype=mha.dtype_policy, **common)
        layer.build((None, None, kernel.shape[0]))
        weights = [kernel.reshape(kernel.shape[0], heads * size)]
        if mha._use_bias:
            weights.append(dense.bias.numpy().reshape(heads * size))
        layer.set_weights(weights)
        parts[part] = layer

    parts["core"] = AttentionCore(heads, size, dropout_rate=float(mha._dropout),
                                  name=f"{mha.name}/core", dtype=mha.dtype_policy)

    kernel = mha._output_dense.kernel.numpy()
    output = keras.layers.Dense(kernel.shape[-1], name=f"{mha.name}/output",
                                dtype=mha.dtype_policy, **common)
    output.build((None, None, heads * size))
    weights = [kernel.reshape(heads * size, kernel.shape[-1])]
    if mha._use_bias:
        weights.append(mha._output_dense.bias.numpy())
    output.set_weights(weights)
    parts["output"] = output
    return parts


def _split_attention(model, names):
    parts_by_layer = {}

    def expand_node(node, args, kwargs):
        layer = node.layer
        if layer.name not in names:
            return None
        if id(layer) not in parts_by_layer:
            parts_by_layer[id(layer)] = _mha_parts(layer)
        parts = parts_by_layer[id(layer)]
        bound = inspect.signature(layer.call).bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        query, value = arguments["query"], arguments["value"]
        key = value if arguments["key"] is None else arguments["key"]

        q = parts["query"](query)
        k = parts["key"](key)
        v = parts["value"](value)
        # All keys are attended: the split is only made when no mask was given.
        mask = tf.ones_like(k[:, :, 0])
        call_kwargs = {}
        if arguments.get("training") is not None:
            call_kwargs["training"] = arguments["training"]
        context = parts["core"]([q, k, v, mask], **call_kwargs)
        return parts["output"](context)

    new_model, _ = graph.rebuild(model, expand_node=expand_node)
    logger.info("split MultiHeadAttention layers %s of %r", sorted(names), model.name)
    return new_model


def _budget_ranks(model, plan):
    """Ranks chosen by ``select_ranks`` for rules whose low_rank has a parameter budget."""
    groups = {}
    for name, actions in plan.layers.items():
        if "low_rank" in actions and "budget" in actions["low_rank"][1]:
            rule, arguments = actions["low_rank"]
            groups.setdefault(id(rule), (arguments, []))[1].append(model.get_layer(name))
    ranks = {}
    if groups:
        from tfcompress.layers import select_ranks
    for arguments, layers in groups.values():
        budget = arguments["budget"]
        if isinstance(budget, float):
            # select_ranks budgets the factor parameters, biases not counted.
            kernels = 0
            for layer in layers:
                variable = layer.embeddings if hasattr(layer, "embeddings") else layer.kernel
                kernels += int(tf.size(variable))
            budget = int(budget * kernels)
        ranks.update(select_ranks(layers, budget))
    return ranks


def _describe(action, arguments):
    shown = ", ".join(f"{k}={v}" for k, v in arguments.items())
    return f"{action}({shown})"


def _compress_layer(source, actions, calibration_inputs, ranks):
    """Apply the per-layer actions to one built layer; return the new layer and its report."""
    import tfcompress.layers as compressed

    layer = source
    applied, notes = [], []
    for action in LAYER_ACTIONS:
        if action not in actions:
            continue
        _, arguments = actions[action]
        if action == "low_rank":
            rank = ranks.get(source.name, arguments.get("rank"))
            layer = compressed.low_rank(layer, rank=rank, energy=arguments.get("energy"),
                                        method=arguments["method"], force=arguments["force"],
                                        calibration_inputs=calibration_inputs)
            used = {"rank": int(layer.rank)} if hasattr(layer, "rank") else {}
            applied.append(_describe(action, {**arguments, **used}))
        elif action == "prune":
            layer = compressed.prune(layer, calibration_inputs=calibration_inputs,
                                     **{k: v for k, v in arguments.items()})
            applied.append(_describe(action, arguments))
        elif action == "quantize":
            if isinstance(layer, keras.layers.LayerNormalization):
                notes.append("kept in float32 (LayerNormalization)")
                continue
            if graph.class_names(layer).count("AttentionCore") and arguments["mode"] != "qat":
                notes.append(f"quantize mode {arguments['mode']!r} skipped: the attention "
                             "core has no weights, only mode 'qat' applies to it")
                continue
            layer = compressed.quantize(layer, mode=arguments["mode"], bits=arguments["bits"],
                                        calibration_inputs=calibration_inputs)
            applied.append(_describe(action, arguments))
        elif action == "sparse":
            layer = compressed.to_sparse(layer)
            applied.append(_describe(action, arguments))

    if layer is source:
        # Only notes apply (a LayerNormalization under quantize): keep an exact copy.
        layer = graph.copy_layer(source)
        if source.built:
            layer.build(source._build_input_shape)
            layer.set_weights(source.get_weights())

    error = None
    if calibration_inputs is not None:
        reference = source(calibration_inputs, training=False)
        error = relative_error(reference, layer(calibration_inputs, training=False))
    report = LayerReport(
        name=source.name, actions=applied, source_type=type(source).__name__,
        new_type=type(layer).__name__, params_before=count_parameters(source),
        params_after=count_parameters(layer), bytes_before=count_bytes(source),
        bytes_after=count_bytes(layer), sparsity=kernel_sparsity(layer),
        rank=int(layer.rank) if hasattr(layer, "rank") else None, error=error, notes=notes)
    return layer, report
