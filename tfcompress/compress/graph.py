"""Rebuilding a tf_keras functional or Sequential model layer by layer.

``rebuild`` walks the graph of a model in topological order and calls each layer's
replacement on the new tensors. A caller may replace a layer by another built layer, or
replace one layer call by several layers (how MultiHeadAttention is split). Every other
layer is copied with ``from_config(get_config())`` and gets the source weights, so the
new model shares no variable with the source. TF op layers (``TFOpLambda``,
``SlicingOpLambda``) and ``Add`` residuals are copied that way too.

``layer_table`` lists every layer a recipe can address, including layers that cannot be
replaced (inside a subclassed layer or a nested model) with the reason.
"""

import inspect

from tf_keras.src.engine import keras_tensor

from tfcompress._keras import keras, tf

MHA_PARTS = ("query", "key", "value", "core", "output")


def class_names(layer):
    """Names of the layer's class and of its base classes."""
    return tuple(cls.__name__ for cls in type(layer).__mro__)


def copy_layer(layer):
    """Return an unbuilt copy of ``layer`` made from its config."""
    try:
        return type(layer).from_config(layer.get_config())
    except Exception as error:  # noqa: BLE001  (any failure means the layer cannot be copied)
        raise TypeError(
            f"layer {layer.name!r} ({type(layer).__name__}) cannot be re-created from its "
            f"config: {type(error).__name__}: {error}. Give the class a get_config() that "
            "returns every constructor argument.") from error


def is_graph_model(model):
    return isinstance(model, keras.Model) and getattr(model, "_is_graph_network", False)


def _is_keras_tensor(value):
    return isinstance(value, keras_tensor.KerasTensor)


def mha_call_arguments(node):
    """Return the bound arguments of a MultiHeadAttention call as a dict."""
    signature = inspect.signature(node.layer.call)
    bound = signature.bind(*node.call_args, **node.call_kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def mha_unsupported_reason(layer, nodes):
    """Return why a MultiHeadAttention cannot be split into separate layers, or None."""
    if layer._attention_axes not in (None, (1,)):
        return f"attention_axes={layer._attention_axes} (only the sequence axis is supported)"
    if layer._value_dim != layer._key_dim:
        return f"value_dim={layer._value_dim} differs from key_dim={layer._key_dim}"
    if layer._output_shape is not None:
        return f"output_shape={layer._output_shape} is set"
    for node in nodes:
        arguments = mha_call_arguments(node)
        if arguments["attention_mask"] is not None:
            return "it is called with an attention_mask"
        if arguments["use_causal_mask"] or arguments["return_attention_scores"]:
            return "it is called with use_causal_mask or return_attention_scores"
        for name in ("query", "value", "key"):
            tensor = arguments[name]
            if tensor is None:
                continue
            if getattr(tensor, "_keras_mask", None) is not None:
                return f"its {name} input carries a Keras mask"
            if tensor.shape.rank != 3:
                return f"its {name} input has rank {tensor.shape.rank}, not 3"
    return None


def layer_table(model):
    """List ``(name, class names, reason or None, parent or None)`` for every layer.

    ``parent`` is ``(name, class names)`` of the MultiHeadAttention a part belongs to.
    A keras MultiHeadAttention of a functional model appears as five parts named
    ``<name>/query``, ``<name>/key``, ``<name>/value``, ``<name>/core`` and
    ``<name>/output``. The four projections match the types Dense and EinsumDense, and
    the core matches AttentionCore.
    """
    entries = []
    nodes = _nodes_by_layer(model)
    for layer in model.layers:
        classes = class_names(layer)
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.layers.MultiHeadAttention):
            reason = mha_unsupported_reason(layer, nodes.get(id(layer), []))
            if reason is not None:
                reason = (f"MultiHeadAttention {layer.name!r} cannot be split into "
                          f"separate layers because {reason}")
            parent = (layer.name, classes)
            for part in MHA_PARTS:
                part_classes = ("AttentionCore",) if part == "core" else ("Dense", "EinsumDense")
                entries.append((f"{layer.name}/{part}", part_classes, reason, parent))
            continue
        entries.append((layer.name, classes, None, None))
        if isinstance(layer, keras.Model):
            reason = (f"it is inside the nested model {layer.name!r}; build the model flat "
                      "(call the inner model's layers directly) to compress it")
        else:
            reason = (f"it is inside the subclassed layer {layer.name!r} "
                      f"({type(layer).__name__}), whose call() tfcompress cannot rewire")
        for sub in layer._flatten_layers(include_self=False, recursive=True):
            entries.append((f"{layer.name}/{sub.name}", class_names(sub), reason, None))
    return entries


def _nodes_by_layer(model):
    result = {}
    if not is_graph_model(model):
        return result
    for nodes in model._nodes_by_depth.values():
        for node in nodes:
            if not node.is_input:
                result.setdefault(id(node.layer), []).append(node)
    return result


def rebuild(model, replace_layer=None, expand_node=None, name=None):
    """Return a new model with the graph of ``model`` and new layers.

    Args:
      model: a functional or Sequential tf_keras model with known inputs.
      replace_layer: function ``layer -> new built layer or None``. None (or a None
        result) copies the layer. It is called once per layer, so a shared layer stays
        shared.
      expand_node: function ``(node, args, kwargs) -> outputs or None`` that may call
        several new layers in place of one layer call (used to split
        MultiHeadAttention). A None result falls back to ``replace_layer``.
      name: name of the new model, the source name by default.

    Returns:
      ``(new_model, layers)`` where ``layers`` maps ``id(source layer)`` to
      ``(source layer, new layer)`` for every layer that was copied or replaced.
    """
    if not is_graph_model(model):
        raise TypeError(
            f"model {model.name!r} is a subclassed Model, whose call() tfcompress cannot "
            "rewire; build it with the functional API or keras.Sequential.")
    layers = {}
    copied = set()

    def new_layer(layer):
        if id(layer) not in layers:
            replacement = replace_layer(layer) if replace_layer is not None else None
            if replacement is None:
                replacement = copy_layer(layer)
                copied.add(id(layer))
            layers[id(layer)] = (layer, replacement)
        return layers[id(layer)][1]

    if isinstance(model, keras.Sequential):
        first = model.inputs[0]
        new_model = keras.Sequential(name=name or model.name)
        new_model.add(keras.Input(batch_size=first.shape[0], shape=first.shape[1:],
                                  dtype=first.dtype))
        for layer in model.layers:
            new_model.add(new_layer(layer))
    else:
        new_model = _rebuild_functional(model, new_layer, expand_node, name)

    # Copies are built by the calls above, so their weights exist only now.
    for key in copied:
        source, target = layers[key]
        target.set_weights(source.get_weights())
    return new_model, layers


def _rebuild_functional(model, new_layer, expand_node, name):
    tensors = {}
    for tensor in model.inputs:
        layer = tensor._keras_history.layer
        tensors[id(tensor)] = keras.Input(
            batch_size=tensor.shape[0], shape=tensor.shape[1:], dtype=tensor.dtype,
            name=layer.name, sparse=getattr(tensor, "sparse", False),
            ragged=getattr(tensor, "ragged", False))

    def convert(value):
        if _is_keras_tensor(value):
            return tensors[id(value)]
        return value

    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input:
                continue
            args = tf.nest.map_structure(convert, node.call_args)
            kwargs = tf.nest.map_structure(convert, node.call_kwargs)
            outputs = expand_node(node, args, kwargs) if expand_node is not None else None
            if outputs is None:
                outputs = new_layer(node.layer)(*args, **kwargs)
            for old, new in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(outputs)):
                tensors[id(old)] = new

    inputs = tf.nest.map_structure(lambda t: tensors[id(t)], model._nested_inputs)
    outputs = tf.nest.map_structure(lambda t: tensors[id(t)], model._nested_outputs)
    return keras.Model(inputs, outputs, name=name or model.name)
