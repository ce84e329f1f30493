"""Keras BERT encoder with the TF-Hub BERT encoder interface.

Inputs are the int32 tensors ``input_word_ids``, ``input_mask`` and ``input_type_ids``
of shape [batch, seq]. Outputs are a dict with ``sequence_output`` [batch, seq, hidden],
``pooled_output`` [batch, hidden] and ``encoder_outputs``, the list of each block's
output. Every projection is its own named layer so a recipe can address it by regex:

    embeddings/word_embeddings, embeddings/position_embeddings,
    embeddings/type_embeddings, embeddings/layer_norm,
    transformer/layer_{i}/attention/{query,key,value,core,output,layer_norm},
    transformer/layer_{i}/ffn/{intermediate,output,layer_norm},
    pooler

LayerNormalization layers and the attention softmax run in float32 under any mixed
precision policy, because float16 loses too much in their reductions.
"""

import re

from tfcompress._keras import keras, tf
from tfcompress.bert.config import BertConfig
from tfcompress.bert.layers import AttentionCore, MaskedMeanPooling, PositionEmbedding

INPUT_NAMES = ("input_word_ids", "input_mask", "input_type_ids")
_LAYER_PATTERN = re.compile(r"^transformer/layer_(\d+)/")


def _activation_name(name):
    # Keras serializes "gelu" as exact GELU; the approximate form needs a function name
    # that Keras can look up again on reload.
    return {"gelu": "gelu", "relu": "relu", "gelu_approximate": "tfcompress>gelu_approximate"}[name]


@keras.utils.register_keras_serializable(package="tfcompress", name="gelu_approximate")
def gelu_approximate(x):
    """GELU with the tanh approximation (Hugging Face ``gelu_new``)."""
    return tf.nn.gelu(x, approximate=True)


def _initializer():
    # A new instance per layer: one shared unseeded instance gives every layer the same values.
    return keras.initializers.TruncatedNormal(stddev=0.02)


def _dense(units, name, activation=None):
    return keras.layers.Dense(units, activation=activation, kernel_initializer=_initializer(),
                              name=name)


def build_encoder(config, name="bert_encoder"):
    """Build a randomly initialised encoder for ``config``.

    Args:
      config: a ``BertConfig`` or a dict of its fields.
      name: name of the returned Keras model.

    Returns:
      A functional ``tf_keras.Model`` mapping the input dict to the output dict.
    """
    if isinstance(config, dict):
        config = BertConfig.from_dict(config)
    if not isinstance(config, BertConfig):
        raise TypeError(f"config must be a BertConfig or a dict; received {type(config).__name__}.")

    inputs = {n: keras.Input(shape=(None,), dtype=tf.int32, name=n) for n in INPUT_NAMES}
    mask = inputs["input_mask"]

    # Embeddings: word + position + token type, then LayerNorm and dropout.
    word = keras.layers.Embedding(config.vocab_size, config.hidden_size,
                                  embeddings_initializer=_initializer(),
                                  name="embeddings/word_embeddings")(inputs["input_word_ids"])
    position = PositionEmbedding(config.max_position_embeddings, initializer=_initializer(),
                                 name="embeddings/position_embeddings")(word)
    token_type = keras.layers.Embedding(config.type_vocab_size, config.hidden_size,
                                        embeddings_initializer=_initializer(),
                                        name="embeddings/type_embeddings")(inputs["input_type_ids"])
    x = keras.layers.Add(name="embeddings/add")([word, position, token_type])
    x = keras.layers.LayerNormalization(epsilon=config.layer_norm_eps, dtype="float32",
                                        name="embeddings/layer_norm")(x)
    x = keras.layers.Dropout(config.dropout_rate, name="embeddings/dropout")(x)

    head_size = config.attention_head_size
    encoder_outputs = []
    for i in range(config.num_layers):
        prefix = f"transformer/layer_{i}"
        heads = config.heads(i)

        # Self-attention block (post-LayerNorm, as in BERT).
        query = _dense(heads * head_size, f"{prefix}/attention/query")(x)
        key = _dense(heads * head_size, f"{prefix}/attention/key")(x)
        value = _dense(heads * head_size, f"{prefix}/attention/value")(x)
        context = AttentionCore(heads, head_size, config.attention_dropout_rate,
                                name=f"{prefix}/attention/core")([query, key, value, mask])
        attention = _dense(config.hidden_size, f"{prefix}/attention/output")(context)
        attention = keras.layers.Dropout(config.dropout_rate,
                                         name=f"{prefix}/attention/dropout")(attention)
        x = keras.layers.Add(name=f"{prefix}/attention/residual")([x, attention])
        x = keras.layers.LayerNormalization(epsilon=config.layer_norm_eps, dtype="float32",
                                            name=f"{prefix}/attention/layer_norm")(x)

        # Feed-forward block.
        hidden = _dense(config.intermediate(i), f"{prefix}/ffn/intermediate",
                        activation=_activation_name(config.hidden_act))(x)
        hidden = _dense(config.hidden_size, f"{prefix}/ffn/output")(hidden)
        hidden = keras.layers.Dropout(config.dropout_rate, name=f"{prefix}/ffn/dropout")(hidden)
        x = keras.layers.Add(name=f"{prefix}/ffn/residual")([x, hidden])
        x = keras.layers.LayerNormalization(epsilon=config.layer_norm_eps, dtype="float32",
                                            name=f"{prefix}/ffn/layer_norm")(x)
        encoder_outputs.append(x)

    first_token = x[:, 0, :]
    pooled = _dense(config.hidden_size, "pooler", activation="tanh")(first_token)
    outputs = {"sequence_output": x, "pooled_output": pooled, "encoder_outputs": encoder_outputs}
    return keras.Model(inputs=inputs, outputs=outputs, name=name)


def encoder_config(encoder):
    """Recover the ``BertConfig`` of an encoder built by ``build_encoder``.

    Shapes are read from the layers, so this also works on a reloaded encoder and on
    one whose heads or FFN neurons were removed. Dropout rates are read from the
    dropout layers.
    """
    layers = {layer.name: layer for layer in encoder.layers}
    required = ("embeddings/word_embeddings", "embeddings/position_embeddings",
                "embeddings/type_embeddings", "embeddings/layer_norm")
    missing = [n for n in required if n not in layers]
    if missing:
        raise ValueError(
            f"model {encoder.name!r} is not a tfcompress BERT encoder: layers {missing} are "
            "missing. Build it with tfcompress.bert.build_encoder, load_minilm, "
            "from_huggingface or from_hub."
        )
    indices = sorted({int(m.group(1)) for n in layers if (m := _LAYER_PATTERN.match(n))})
    word = layers["embeddings/word_embeddings"]
    heads, intermediate = [], []
    head_size = None
    for i in indices:
        core = layers[f"transformer/layer_{i}/attention/core"]
        heads.append(core.num_heads)
        head_size = core.head_size
        intermediate.append(_output_units(layers[f"transformer/layer_{i}/ffn/intermediate"]))
    hidden = int(word.output_dim) if hasattr(word, "output_dim") else _output_units(word)
    first = layers.get("transformer/layer_0/ffn/intermediate")
    act = "gelu"
    if first is not None and hasattr(first, "activation"):
        act_name = getattr(first.activation, "__name__", "gelu")
        act = {"relu": "relu", "gelu_approximate": "gelu_approximate"}.get(act_name, "gelu")
    dropout = layers["embeddings/dropout"].rate if "embeddings/dropout" in layers else 0.1
    core0 = layers.get("transformer/layer_0/attention/core")
    uniform_heads = len(set(heads)) <= 1
    uniform_ffn = len(set(intermediate)) <= 1
    return BertConfig(
        vocab_size=int(word.input_dim) if hasattr(word, "input_dim") else word.vocab_size,
        hidden_size=hidden,
        num_layers=len(indices),
        num_heads=heads[0] if heads else 1,
        intermediate_size=intermediate[0] if intermediate else 1,
        max_position_embeddings=layers["embeddings/position_embeddings"].max_length,
        type_vocab_size=int(layers["embeddings/type_embeddings"].input_dim),
        hidden_act=act,
        layer_norm_eps=float(layers["embeddings/layer_norm"].epsilon),
        dropout_rate=float(dropout),
        attention_dropout_rate=float(core0.dropout_rate) if core0 is not None else 0.1,
        # 0 means "hidden_size // num_heads", the default, so equal configs compare equal.
        head_size=0 if head_size in (None, hidden // max(heads[0] if heads else 1, 1)) else head_size,
        layer_heads=() if uniform_heads else tuple(heads),
        layer_intermediate_sizes=() if uniform_ffn else tuple(intermediate),
    )


def _output_units(layer):
    units = getattr(layer, "units", None)
    if units is None and hasattr(layer, "kernel"):
        units = int(layer.kernel.shape[-1])
    if units is None:
        raise ValueError(f"cannot read the output width of layer {layer.name!r}.")
    return int(units)


def classifier(encoder, num_classes, dropout=0.1, pooling="pooled", name="bert_classifier"):
    """Build a sequence classifier on top of ``encoder``.

    The returned model is flat: it reuses the encoder's layers (and so its weights) and
    adds a dropout and a logits layer, so every encoder projection stays addressable by
    name. Logits are float32 under any precision policy.

    Args:
      encoder: a BERT encoder with the TF-Hub interface.
      num_classes: number of output classes, at least 2.
      dropout: dropout rate before the logits layer.
      pooling: "pooled" for the pooler output, "mean" for the masked mean of
        ``sequence_output``.
      name: name of the returned model.

    Returns:
      A ``tf_keras.Model`` from the encoder's input dict to [batch, num_classes] logits.
    """
    from tfcompress._keras import check_model

    check_model(encoder, "encoder")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2; received {num_classes!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); received {dropout!r}.")
    if pooling not in ("pooled", "mean"):
        raise ValueError(f"pooling must be 'pooled' or 'mean'; received {pooling!r}.")
    if not isinstance(encoder.output, dict) or "pooled_output" not in encoder.output:
        raise ValueError(
            f"encoder {encoder.name!r} does not return a dict with pooled_output and "
            "sequence_output; pass an encoder with the TF-Hub BERT interface."
        )

    outputs = encoder.output
    if pooling == "pooled":
        features = outputs["pooled_output"]
    else:
        mask = encoder.input["input_mask"]
        features = MaskedMeanPooling(name="classifier/mean_pooling")(
            [outputs["sequence_output"], mask])
    features = keras.layers.Dropout(dropout, name="classifier/dropout")(features)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="classifier/logits",
                                kernel_initializer=_initializer())(features)
    return keras.Model(inputs=encoder.input, outputs=logits, name=name)
