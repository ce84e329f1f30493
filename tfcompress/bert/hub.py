"""Export to and import from TF-Hub BERT encoder SavedModels.

The TF-Hub BERT encoders published by TF Model Garden (``official.nlp``) take the dict
of int32 ``input_word_ids``, ``input_mask`` and ``input_type_ids`` [batch, seq] and
return ``sequence_output``, ``pooled_output``, ``default`` (the pooled output again)
and ``encoder_outputs`` (one tensor per block). Their variables carry Model Garden
names, and the attention projections are EinsumDense kernels:

    word_embeddings/embeddings                                [vocab, hidden]
    position_embedding/embeddings                             [max_positions, hidden]
    type_embeddings/embeddings                                [type_vocab, hidden]
    embeddings/layer_norm/{gamma,beta}                        [hidden]
    transformer/layer_{i}/self_attention/{query,key,value}/kernel  [hidden, heads, head_size]
    transformer/layer_{i}/self_attention/{query,key,value}/bias    [heads, head_size]
    transformer/layer_{i}/self_attention/attention_output/kernel   [heads, head_size, hidden]
    transformer/layer_{i}/self_attention/attention_output/bias     [hidden]
    transformer/layer_{i}/self_attention_layer_norm/{gamma,beta}
    transformer/layer_{i}/intermediate/{kernel,bias}          [hidden, ffn], [ffn]
    transformer/layer_{i}/output/{kernel,bias}                [ffn, hidden], [hidden]
    transformer/layer_{i}/output_layer_norm/{gamma,beta}
    pooler_transform/{kernel,bias}                            [hidden, hidden], [hidden]

``export_hub`` writes that format from a tfcompress encoder with a small ``tf.Module``
style forward pass (no Keras metadata), so ``hub.KerasLayer(folder, trainable=True)``
can load and fine-tune it. ``from_hub`` reads the variable names and shapes from the
SavedModel's object graph, infers the ``BertConfig``, copies the weights into a Keras
encoder and checks the two against each other on random inputs.

What this adds to tensorflow-hub: the name and shape mapping between Model Garden
EinsumDense variables and tfcompress' per-projection Dense layers, and the output check.
"""

import json
import logging
import math
import os
import re
import shutil
import tempfile

import numpy as np

from tfcompress._keras import check_model, keras, tf
from tfcompress.bert.checks import check_vocab
from tfcompress.bert.config import BertConfig
from tfcompress.bert.encoder import INPUT_NAMES, build_encoder, encoder_config
from tfcompress.bert.layers import mask_scores

logger = logging.getLogger(__name__)

# Written next to the vocab file in assets/ by export_hub, read back by from_hub for
# what the variables do not show (activation, LayerNorm epsilon, dropout rates).
CONFIG_ASSET = "tfcompress_bert_config.json"

# Largest absolute difference from_hub accepts between the SavedModel and the rebuilt
# encoder. Both compute in float32, where reordered sums differ by about 1e-6.
IMPORT_TOLERANCE = 1e-4

_LAYER_INDEX = re.compile(r"^transformer/layer_(\d+)/")
_URL = re.compile(r"^https?://", re.IGNORECASE)


# ---------------------------------------------------------------------------
# Name mapping shared by export and import.
# ---------------------------------------------------------------------------

def _embedding_names():
    """Yield (hub variable name, Keras layer name, weight index)."""
    yield "word_embeddings/embeddings", "embeddings/word_embeddings", 0
    yield "position_embedding/embeddings", "embeddings/position_embeddings", 0
    yield "type_embeddings/embeddings", "embeddings/type_embeddings", 0
    yield "embeddings/layer_norm/gamma", "embeddings/layer_norm", 0
    yield "embeddings/layer_norm/beta", "embeddings/layer_norm", 1


def _block_names(i):
    """Yield (hub variable name, Keras layer name, weight index, kind) for block ``i``.

    ``kind`` names the hub tensor's layout: "in_heads" for [hidden, heads, head_size]
    kernels, "heads" for [heads, head_size] biases, "heads_in" for [heads, head_size,
    hidden] kernels, "plain" where hub and Keras shapes agree.
    """
    hub, ours = f"transformer/layer_{i}", f"transformer/layer_{i}"
    for part in ("query", "key", "value"):
        yield f"{hub}/self_attention/{part}/kernel", f"{ours}/attention/{part}", 0, "in_heads"
        yield f"{hub}/self_attention/{part}/bias", f"{ours}/attention/{part}", 1, "heads"
    yield f"{hub}/self_attention/attention_output/kernel", f"{ours}/attention/output", 0, "heads_in"
    yield f"{hub}/self_attention/attention_output/bias", f"{ours}/attention/output", 1, "plain"
    pairs = (("self_attention_layer_norm", "attention/layer_norm", ("gamma", "beta")),
             ("intermediate", "ffn/intermediate", ("kernel", "bias")),
             ("output", "ffn/output", ("kernel", "bias")),
             ("output_layer_norm", "ffn/layer_norm", ("gamma", "beta")))
    for hub_part, our_part, weight_names in pairs:
        for index, weight_name in enumerate(weight_names):
            yield f"{hub}/{hub_part}/{weight_name}", f"{ours}/{our_part}", index, "plain"


def _pooler_names():
    yield "pooler_transform/kernel", "pooler", 0
    yield "pooler_transform/bias", "pooler", 1


# ---------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------

def _layer_norm(x, gamma, beta, epsilon):
    # Same formula as keras.layers.LayerNormalization over the last axis.
    mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
    return (x - mean) * tf.math.rsqrt(variance + epsilon) * gamma + beta


def _activation(name):
    return {
        "gelu": lambda x: tf.nn.gelu(x, approximate=False),
        "gelu_approximate": lambda x: tf.nn.gelu(x, approximate=True),
        "relu": tf.nn.relu,
    }[name]


class _HubBertEncoder(tf.train.Checkpoint):
    """A SavedModel root with the reusable-SavedModel attributes TF-Hub expects.

    ``__call__(inputs, training=False)`` runs the encoder; ``variables``,
    ``trainable_variables`` and ``regularization_losses`` let ``hub.KerasLayer``
    register the weights so fine-tuning through it updates them.
    """

    def __init__(self, weights, config, asset_paths):
        super().__init__()
        self._config = config
        self._weights = {name: tf.Variable(value, name=name, trainable=True)
                         for name, value in weights.items()}
        self.variables = list(self._weights.values())
        self.trainable_variables = list(self._weights.values())
        self.regularization_losses = []
        for attribute, path in asset_paths.items():
            setattr(self, attribute, tf.saved_model.Asset(path))

    def _dropout(self, x, rate, training):
        if training and rate > 0.0:
            return tf.nn.dropout(x, rate=rate)
        return x

    def _forward(self, inputs, training):
        config, w = self._config, self._weights
        epsilon = config.layer_norm_eps
        act = _activation(config.hidden_act)
        word_ids = inputs["input_word_ids"]
        seq_length = tf.shape(word_ids)[1]

        # Embeddings.
        x = (tf.gather(w["word_embeddings/embeddings"], word_ids)
             + w["position_embedding/embeddings"][tf.newaxis, :seq_length, :]
             + tf.gather(w["type_embeddings/embeddings"], inputs["input_type_ids"]))
        x = _layer_norm(x, w["embeddings/layer_norm/gamma"], w["embeddings/layer_norm/beta"],
                        epsilon)
        x = self._dropout(x, config.dropout_rate, training)

        # Padded keys are masked as in the Keras encoder (tfcompress.bert.layers.mask_scores).
        mask = tf.cast(inputs["input_mask"], tf.float32)

        encoder_outputs = []
        for i in range(config.num_layers):
            p = f"transformer/layer_{i}"
            # b: batch, f: query position, t: key position, n: head, h: head width, d: hidden.
            query = tf.einsum("btd,dnh->btnh", x, w[f"{p}/self_attention/query/kernel"])
            query += w[f"{p}/self_attention/query/bias"]
            key = tf.einsum("btd,dnh->btnh", x, w[f"{p}/self_attention/key/kernel"])
            key += w[f"{p}/self_attention/key/bias"]
            value = tf.einsum("btd,dnh->btnh", x, w[f"{p}/self_attention/value/kernel"])
            value += w[f"{p}/self_attention/value/bias"]
            head_size = int(query.shape[-1])
            scores = tf.einsum("bfnh,btnh->bnft", query, key) * (1.0 / math.sqrt(head_size))
            probs = tf.nn.softmax(mask_scores(scores, mask), axis=-1)
            probs = self._dropout(probs, config.attention_dropout_rate, training)
            context = tf.einsum("bnft,btnh->bfnh", probs, value)
            attention = tf.einsum("bfnh,nhd->bfd", context,
                                  w[f"{p}/self_attention/attention_output/kernel"])
            attention += w[f"{p}/self_attention/attention_output/bias"]
            attention = self._dropout(attention, config.dropout_rate, training)
            x = _layer_norm(x + attention, w[f"{p}/self_attention_layer_norm/gamma"],
                            w[f"{p}/self_attention_layer_norm/beta"], epsilon)

            hidden = act(tf.einsum("btd,df->btf", x, w[f"{p}/intermediate/kernel"])
                         + w[f"{p}/intermediate/bias"])
            hidden = tf.einsum("btf,fd->btd", hidden, w[f"{p}/output/kernel"])
            hidden = self._dropout(hidden + w[f"{p}/output/bias"], config.dropout_rate, training)
            x = _layer_norm(x + hidden, w[f"{p}/output_layer_norm/gamma"],
                            w[f"{p}/output_layer_norm/beta"], epsilon)
            encoder_outputs.append(x)

        pooled = tf.tanh(tf.matmul(x[:, 0, :], w["pooler_transform/kernel"])
                         + w["pooler_transform/bias"])
        return {"sequence_output": x, "pooled_output": pooled, "default": pooled,
                "encoder_outputs": encoder_outputs}

    @tf.function
    def __call__(self, inputs, training=False):
        return self._forward(inputs, training)

    @tf.function
    def serve(self, input_word_ids, input_mask, input_type_ids):
        # Signatures return a flat dict of tensors, so the block outputs are numbered.
        outputs = self._forward({"input_word_ids": input_word_ids, "input_mask": input_mask,
                                 "input_type_ids": input_type_ids}, training=False)
        flat = {k: outputs[k] for k in ("sequence_output", "pooled_output", "default")}
        for i, block_output in enumerate(outputs["encoder_outputs"]):
            flat[f"encoder_outputs_{i}"] = block_output
        return flat


def _input_specs():
    return {name: tf.TensorSpec([None, None], tf.int32, name=name) for name in INPUT_NAMES}


def _hub_weights(encoder, config):
    """Return {hub variable name: float32 array} of ``encoder`` in Model Garden shapes."""
    layers = {layer.name: layer for layer in encoder.layers}
    head_size = config.attention_head_size
    unsupported = []
    for i in range(config.num_layers):
        for _, layer_name, _, _ in _block_names(i):
            if layer_name.endswith("layer_norm"):
                continue
            if type(layers[layer_name]) is not keras.layers.Dense:
                unsupported.append(f"{layer_name} ({type(layers[layer_name]).__name__})")
    if type(layers["pooler"]) is not keras.layers.Dense:
        unsupported.append(f"pooler ({type(layers['pooler']).__name__})")
    if unsupported:
        listed = ", ".join(sorted(set(unsupported))[:5])
        raise NotImplementedError(
            f"export_hub writes dense Model Garden kernels, but these layers of "
            f"{encoder.name!r} are not plain Dense layers: {listed}. Strip the model with "
            "tfcompress.strip (or export a float encoder) and export that instead."
        )

    weights = {}
    for hub_name, layer_name, index in [*_embedding_names(), *_pooler_names()]:
        weights[hub_name] = layers[layer_name].weights[index].numpy()
    for i in range(config.num_layers):
        heads = config.heads(i)
        for hub_name, layer_name, index, kind in _block_names(i):
            value = layers[layer_name].weights[index].numpy()
            if kind == "in_heads":
                value = value.reshape(value.shape[0], heads, head_size)
            elif kind == "heads":
                value = value.reshape(heads, head_size)
            elif kind == "heads_in":
                value = value.reshape(heads, head_size, value.shape[-1])
            weights[hub_name] = value
    return {name: np.asarray(value, np.float32) for name, value in weights.items()}


def export_hub(encoder, folder, overwrite=False, vocab_file=None):
    """Write ``encoder`` as a TF-Hub BERT encoder SavedModel.

    The SavedModel's ``__call__(inputs, training=False)`` returns the dict with
    ``sequence_output``, ``pooled_output``, ``default`` and the list
    ``encoder_outputs``. Its ``serving_default`` signature takes the three int32 inputs
    by name and returns the same tensors with the list flattened into
    ``encoder_outputs_0`` ... ``encoder_outputs_{L-1}``. Variables use Model Garden
    names and shapes (see the module docstring) and are all trainable, so
    ``hub.KerasLayer(folder, trainable=True)`` fine-tunes them.

    Args:
      encoder: a tfcompress encoder (``build_encoder``, ``load_minilm``,
        ``from_huggingface``, ``from_hub``) whose projections are plain Dense layers.
      folder: the SavedModel folder to write.
      overwrite: replace ``folder`` if it exists. The new model is written to a
        temporary folder beside it first and moved into place only when complete.
      vocab_file: optional WordPiece vocab, copied to ``assets/`` as TF-Hub BERT
        encoders do. Its size must match the word embedding table.

    Returns:
      The path of the written folder.
    """
    check_model(encoder, "encoder")
    config = encoder_config(encoder)
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FileExistsError(
            f"{folder!r} exists and is a file, not a folder; choose another path for the "
            "SavedModel folder."
        )
    if os.path.exists(folder) and not overwrite:
        raise FileExistsError(
            f"{folder!r} already exists; pass overwrite=True to replace it or choose "
            "another folder."
        )
    if vocab_file is not None:
        vocab_file = os.fspath(vocab_file)
        check_vocab(vocab_file, encoder)
    weights = _hub_weights(encoder, config)

    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", dir=parent)
    try:
        # The config asset is written outside the staging folder; saving copies it.
        config_dir = tempfile.mkdtemp(prefix=".tfcompress-config.", dir=parent)
        try:
            config_path = os.path.join(config_dir, CONFIG_ASSET)
            with open(config_path, "w", encoding="utf-8") as f:
                json.dump(config.to_dict(), f, indent=2, sort_keys=True)
            assets = {"tfcompress_config_file": config_path}
            if vocab_file is not None:
                assets["vocab_file"] = vocab_file
            module = _HubBertEncoder(weights, config, assets)
            for training in (False, True):
                module.__call__.get_concrete_function(_input_specs(), training=training)
            serving = module.serve.get_concrete_function(**_input_specs())
            tf.saved_model.save(module, staging, signatures={"serving_default": serving})
        finally:
            shutil.rmtree(config_dir, ignore_errors=True)
        _move_into_place(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported %d-layer encoder %r to %s", config.num_layers, encoder.name, folder)
    return folder


def _move_into_place(staging, folder):
    """Rename ``staging`` to ``folder``, keeping the old ``folder`` until that succeeds."""
    if not os.path.exists(folder):
        os.rename(staging, folder)
        return
    backup = staging + ".old"
    os.rename(folder, backup)
    try:
        os.rename(staging, folder)
    except OSError:
        os.rename(backup, folder)
        raise
    shutil.rmtree(backup, ignore_errors=True)


# ---------------------------------------------------------------------------
# Import.
# ---------------------------------------------------------------------------

def _resolve(handle_or_path):
    if not isinstance(handle_or_path, (str, os.PathLike)):
        raise TypeError(
            "handle_or_path must be a TF-Hub URL or the path of a SavedModel folder; "
            f"received {type(handle_or_path).__name__}."
        )
    handle = os.fspath(handle_or_path)
    if not _URL.match(handle):
        return handle
    import tensorflow_hub as hub

    try:
        return hub.resolve(handle)
    except (OSError, tf.errors.OpError, ValueError, RuntimeError) as error:
        raise OSError(
            f"could not download the TF-Hub model {handle!r}: {error}. Downloading needs "
            "network access; on a machine without it, download and unpack the SavedModel "
            "elsewhere and pass its local folder instead."
        ) from error


def _read_saved_model(folder):
    """Read a SavedModel's protos without loading its functions.

    Returns:
      (signature names, {variable name: (shape, checkpoint key)}, the op types used in
      its functions, a reader of its variables checkpoint).
    """
    from tensorflow.core.protobuf import saved_model_pb2, trackable_object_graph_pb2

    from google.protobuf.message import DecodeError

    saved_model = saved_model_pb2.SavedModel()
    pb_path = os.path.join(folder, "saved_model.pb")
    with tf.io.gfile.GFile(pb_path, "rb") as f:
        try:
            saved_model.ParseFromString(f.read())
        except DecodeError as error:
            raise ValueError(
                f"{pb_path!r} is not a valid SavedModel protobuf ({error}); export the "
                "model again or pass another folder."
            ) from None
    if not saved_model.meta_graphs:
        raise ValueError(f"{pb_path!r} contains no MetaGraph (an empty or truncated file); "
                         "export the model again or pass another folder.")
    meta_graph = saved_model.meta_graphs[0]
    signatures = sorted(k for k in meta_graph.signature_def if not k.startswith("__"))
    op_types = {node.op for function in meta_graph.graph_def.library.function
                for node in function.node_def}

    # The variables checkpoint numbers its objects as the SavedModel object graph does,
    # so node i's checkpoint key is the one to read node i's value with.
    prefix = os.path.join(folder, "variables", "variables")
    if not tf.io.gfile.exists(prefix + ".index"):
        # A SavedModel without variables, such as a preprocessing model.
        return signatures, {}, op_types, None
    reader = tf.train.load_checkpoint(prefix)
    checkpoint_graph = trackable_object_graph_pb2.TrackableObjectGraph()
    checkpoint_graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    variables = {}
    for node_id, node in enumerate(meta_graph.object_graph_def.nodes):
        if node.WhichOneof("kind") != "variable":
            continue
        keys = [a.checkpoint_key for a in checkpoint_graph.nodes[node_id].attributes
                if a.name == "VARIABLE_VALUE"]
        name = node.variable.name
        name = name[:-2] if name.endswith(":0") else name
        if keys and name not in variables:
            shape = tuple(d.size for d in node.variable.shape.dim)
            variables[name] = (shape, keys[0])
    return signatures, variables, op_types, reader


def _find_prefix(variables):
    """Return the scope before ``word_embeddings/embeddings``, or None if absent."""
    for name in variables:
        if name.endswith("word_embeddings/embeddings"):
            return name[:-len("word_embeddings/embeddings")]
    return None


def _not_an_encoder(folder, signatures, variables, missing):
    names = sorted(variables)
    listed = ", ".join(names[:8]) or "none"
    more = f" (and {len(names) - 8} more)" if len(names) > 8 else ""
    return ValueError(
        f"{folder!r} is a SavedModel but not a TF-Hub BERT encoder: variables {missing} "
        f"are missing. Signatures found: {signatures or 'none'}; variables found: "
        f"{listed}{more}. Pass a BERT encoder exported by TF Model Garden or "
        "tfcompress.bert.export_hub (a preprocessing model has no weights to import)."
    )


def _infer_config(folder, shapes, saved_config):
    """Infer a ``BertConfig`` from variable shapes (Model Garden names, prefix removed)."""
    if "embedding_projection/kernel" in shapes:
        raise NotImplementedError(
            f"{folder!r} projects embeddings of width "
            f"{shapes['embedding_projection/kernel'][0]} to the hidden width "
            f"{shapes['embedding_projection/kernel'][1]} (ALBERT-style factorised "
            "embeddings), which tfcompress encoders do not have. Use an encoder whose "
            "embedding width equals its hidden size."
        )
    vocab_size, hidden = shapes["word_embeddings/embeddings"]

    indices = sorted({int(m.group(1)) for name in shapes if (m := _LAYER_INDEX.match(name))})
    if indices != list(range(len(indices))):
        raise ValueError(f"{folder!r} has transformer blocks {indices}; expected 0..N-1 without gaps.")
    heads, intermediate, head_sizes = [], [], set()
    for i in indices:
        kernel = shapes[f"transformer/layer_{i}/self_attention/query/kernel"]
        if len(kernel) != 3 or kernel[0] != hidden:
            raise ValueError(
                f"transformer/layer_{i}/self_attention/query/kernel in {folder!r} has shape "
                f"{list(kernel)}; a Model Garden encoder has [hidden={hidden}, heads, head_size]."
            )
        heads.append(kernel[1])
        head_sizes.add(kernel[2])
        intermediate.append(shapes[f"transformer/layer_{i}/intermediate/kernel"][1])
    if len(head_sizes) > 1:
        raise NotImplementedError(
            f"{folder!r} has head sizes {sorted(head_sizes)} in different blocks; tfcompress "
            "encoders use one head size."
        )
    head_size = head_sizes.pop()

    values = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_layers=len(indices),
        num_heads=heads[0],
        intermediate_size=intermediate[0],
        max_position_embeddings=shapes["position_embedding/embeddings"][0],
        type_vocab_size=shapes["type_embeddings/embeddings"][0],
        head_size=0 if head_size * heads[0] == hidden else head_size,
        layer_heads=() if len(set(heads)) == 1 else tuple(heads),
        layer_intermediate_sizes=() if len(set(intermediate)) == 1 else tuple(intermediate),
    )
    # What the shapes cannot show comes from export_hub's config asset, if there is one,
    # else from the Model Garden defaults.
    for field in ("hidden_act", "layer_norm_eps", "dropout_rate", "attention_dropout_rate"):
        if field in saved_config:
            values[field] = saved_config[field]
    values.setdefault("layer_norm_eps", 1e-12)
    return BertConfig(**values)


def _activation_candidates(saved_config, op_types):
    """Order the activations to try: the saved one, else the one the graph's ops suggest."""
    if "hidden_act" in saved_config:
        first = saved_config["hidden_act"]
    elif "Erf" in op_types:
        first = "gelu"
    elif "Pow" in op_types:
        # tanh-approximate GELU computes x**3; Model Garden's "gelu" is this one.
        first = "gelu_approximate"
    elif "Relu" in op_types:
        first = "relu"
    else:
        first = "gelu"
    return [first] + [a for a in ("gelu", "gelu_approximate", "relu") if a != first]


def _check_inputs(config, seed=0):
    """Random ids with padding on the second row and both segment ids, when there are two."""
    rng = np.random.default_rng(seed)
    seq = min(16, config.max_position_embeddings)
    ids = rng.integers(1, config.vocab_size, size=(2, seq)).astype(np.int32)
    mask = np.ones((2, seq), np.int32)
    mask[1, seq // 2:] = 0
    ids[1, seq // 2:] = 0
    types = np.zeros((2, seq), np.int32)
    if config.type_vocab_size > 1:
        types[0, seq // 2:] = 1
    return {"input_word_ids": ids, "input_mask": mask, "input_type_ids": types}


def _run_saved_model(loaded, inputs):
    tensors = {k: tf.constant(v) for k, v in inputs.items()}
    if callable(loaded):
        outputs = loaded(tensors, training=False)
    else:
        outputs = loaded.signatures["serving_default"](**tensors)
    return {k: np.asarray(outputs[k]) for k in ("sequence_output", "pooled_output")}


def _largest_difference(encoder, inputs, expected):
    outputs = encoder(inputs, training=False)
    return {k: float(np.max(np.abs(np.asarray(outputs[k]) - expected[k]))) for k in expected}


def from_hub(handle_or_path, name="bert_encoder"):
    """Rebuild a TF-Hub BERT encoder SavedModel as a tfcompress Keras encoder.

    The config (layers, hidden size, heads per block, head size, FFN widths, vocab,
    positions, segment vocab) is inferred from the variable shapes. The activation and
    LayerNorm epsilon come from the config asset ``export_hub`` writes. For other
    producers the epsilon is Model Garden's 1e-12, and the activation is chosen by
    running both models. Exact GELU, tanh GELU and ReLU are tried, starting with the
    one the SavedModel's ops point to.

    Args:
      handle_or_path: the local folder of a SavedModel, or an http(s) TF-Hub URL
        (which needs network access to download).
      name: name of the returned Keras model.

    Returns:
      A tfcompress encoder whose ``sequence_output`` and ``pooled_output`` agree with
      the SavedModel's within ``IMPORT_TOLERANCE`` on random padded inputs.

    Raises:
      FileNotFoundError: the path does not exist.
      ValueError: the folder is not a SavedModel, is not a BERT encoder, or the rebuilt
        encoder's outputs differ from the SavedModel's.
      NotImplementedError: the encoder has parts tfcompress encoders lack.
      OSError: a URL could not be downloaded.
    """
    folder = _resolve(handle_or_path)
    if not os.path.exists(folder):
        raise FileNotFoundError(
            f"SavedModel folder not found: {folder!r}. Pass the folder that contains "
            "saved_model.pb (for a TF-Hub download, the unpacked archive)."
        )
    if not os.path.isdir(folder):
        raise ValueError(
            f"{folder!r} is a file, not a SavedModel folder; pass the folder that contains "
            "saved_model.pb."
        )
    if not os.path.isfile(os.path.join(folder, "saved_model.pb")):
        found = sorted(os.listdir(folder))
        raise ValueError(
            f"{folder!r} is not a SavedModel: it has no saved_model.pb (found "
            f"{found[:8] or 'an empty folder'}). Pass the folder tf.saved_model.save or "
            "a TF-Hub download wrote."
        )

    # Validate names and shapes from the protos before loading any function.
    signatures, variables, op_types, reader = _read_saved_model(folder)
    prefix = _find_prefix(variables)
    required = ["word_embeddings/embeddings", "position_embedding/embeddings",
                "type_embeddings/embeddings", "embeddings/layer_norm/gamma",
                "transformer/layer_0/self_attention/query/kernel", "pooler_transform/kernel"]
    if prefix is None:
        raise _not_an_encoder(folder, signatures, variables, required[:1])
    hub_vars = {name[len(prefix):]: value for name, value in variables.items()
                if name.startswith(prefix)}
    missing = [n for n in required if n not in hub_vars]
    if missing:
        raise _not_an_encoder(folder, signatures, variables, missing)

    saved_config = {}
    config_path = os.path.join(folder, "assets", CONFIG_ASSET)
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            saved_config = json.load(f)
    config = _infer_config(folder, {k: v[0] for k, v in hub_vars.items()}, saved_config)
    expected_names = [n for n, _, _ in [*_embedding_names(), *_pooler_names()]]
    for i in range(config.num_layers):
        expected_names += [n for n, _, _, _ in _block_names(i)]
    missing = [n for n in expected_names if n not in hub_vars]
    if missing:
        raise _not_an_encoder(folder, signatures, variables, missing[:5])

    # Read the weights into Keras shapes.
    values = {}
    for hub_name in expected_names:
        value = reader.get_tensor(hub_vars[hub_name][1])
        if hub_name.endswith(("query/kernel", "key/kernel", "value/kernel")):
            value = value.reshape(value.shape[0], -1)
        elif hub_name.endswith(("query/bias", "key/bias", "value/bias")):
            value = value.reshape(-1)
        elif hub_name.endswith("attention_output/kernel"):
            value = value.reshape(-1, value.shape[-1])
        values[hub_name] = np.asarray(value, np.float32)

    loaded = tf.saved_model.load(folder)
    inputs = _check_inputs(config)
    expected = _run_saved_model(loaded, inputs)

    tried = {}
    for activation in _activation_candidates(saved_config, op_types):
        candidate = BertConfig(**{**config.to_dict(), "hidden_act": activation})
        encoder = _build_with_weights(candidate, values, name)
        differences = _largest_difference(encoder, inputs, expected)
        if max(differences.values()) <= IMPORT_TOLERANCE:
            if tried:
                logger.info("%s uses hidden_act=%r (tried %s first)", folder, activation,
                            sorted(tried))
            return encoder
        tried[activation] = differences
        if "hidden_act" in saved_config:
            break

    report = "; ".join(
        f"{act}: " + ", ".join(f"{k} differs by up to {v:.3g}" for k, v in diffs.items())
        for act, diffs in tried.items())
    raise ValueError(
        f"the encoder rebuilt from {folder!r} does not reproduce the SavedModel's outputs "
        f"within {IMPORT_TOLERANCE} ({report}). The SavedModel computes something this "
        "import does not map (another activation, LayerNorm epsilon or attention variant)."
    )


def _build_with_weights(config, values, name):
    encoder = build_encoder(config, name=name)
    layers = {layer.name: layer for layer in encoder.layers}
    names = [(h, k, i) for h, k, i in [*_embedding_names(), *_pooler_names()]]
    for block in range(config.num_layers):
        names += [(h, k, i) for h, k, i, _ in _block_names(block)]
    for hub_name, layer_name, index in names:
        variable = layers[layer_name].weights[index]
        value = values[hub_name]
        if tuple(variable.shape) != value.shape:
            raise ValueError(
                f"{hub_name} has shape {list(value.shape)} after reshaping, but the inferred "
                f"config gives {layer_name} the shape {list(variable.shape)}."
            )
        variable.assign(value)
    return encoder
