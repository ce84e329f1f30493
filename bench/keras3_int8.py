"""Keras 3's own int8 quantization of a BERT classifier, run in a separate process.

Keras 3 (the ``keras`` package) cannot share a process with tf_keras once
``TF_USE_LEGACY_KERAS`` is set, so ``bench.size_accuracy`` saves the baseline's
weights and test split to an ``.npz`` file and runs this module as
``python -m bench.keras3_int8 WEIGHTS.npz CONFIG.json OUT_FOLDER``. It rebuilds the same
classifier from Keras 3 layers: Dense projections, and the attention written with
``keras.ops``. It checks the rebuilt model's logits against the parent's, calls
``model.quantize("int8")`` and saves the model as ``.keras``. It prints one JSON line
with the sizes on disk and the logit difference. The int8 test logits go to an ``.npy`` file
that the parent scores with ``tfcompress.evaluate``.
"""

import json
import math
import os
import sys

if os.environ.get("TF_USE_LEGACY_KERAS", "0") not in ("", "0", "false", "False"):
    raise SystemExit("run bench.keras3_int8 with TF_USE_LEGACY_KERAS unset; it needs Keras 3.")

import numpy as np  # noqa: E402

INPUT_NAMES = ("input_word_ids", "input_mask", "input_type_ids")
# tf_keras layer names use "/", which Keras 3 does not allow in layer names.
SEPARATOR = "__"


def _name(tf_keras_name):
    return tf_keras_name.replace("/", SEPARATOR)


def build_classifier(config):
    """Build the tfcompress BERT classifier's math from Keras 3 layers."""
    import keras
    from keras import layers, ops

    hidden = config["hidden_size"]
    heads = config["num_heads"]
    head_size = config["head_size"]
    epsilon = config["layer_norm_eps"]
    approximate = config["hidden_act"] == "gelu_approximate"

    def activation(x):
        if config["hidden_act"] == "relu":
            return ops.relu(x)
        return ops.gelu(x, approximate=approximate)

    class PositionTable(layers.Layer):
        def build(self, input_shape):
            self.embeddings = self.add_weight(
                shape=(config["max_position_embeddings"], hidden), name="embeddings")

        def call(self, x):
            return x + self.embeddings[None, :ops.shape(x)[1], :]

    class Attention(layers.Layer):
        def call(self, query, key, value, mask):
            def split(x):
                x = ops.reshape(x, (ops.shape(x)[0], ops.shape(x)[1], heads, head_size))
                return ops.transpose(x, (0, 2, 1, 3))

            scores = ops.matmul(split(query), ops.transpose(split(key), (0, 1, 3, 2)))
            scores = scores / math.sqrt(head_size)
            bias = (1.0 - ops.cast(mask, "float32"))[:, None, None, :] * -10000.0
            probs = ops.softmax(scores + bias, axis=-1)
            context = ops.transpose(ops.matmul(probs, split(value)), (0, 2, 1, 3))
            return ops.reshape(context, (ops.shape(context)[0], ops.shape(context)[1],
                                         heads * head_size))

    class MeanPooling(layers.Layer):
        def call(self, sequence, mask):
            mask = ops.cast(mask, "float32")[:, :, None]
            count = ops.maximum(ops.sum(mask, axis=1), 1e-9)
            return ops.sum(sequence * mask, axis=1) / count

    inputs = {n: keras.Input(shape=(None,), dtype="int32", name=n) for n in INPUT_NAMES}
    mask = inputs["input_mask"]
    word = layers.Embedding(config["vocab_size"], hidden,
                            name=_name("embeddings/word_embeddings"))(inputs["input_word_ids"])
    types = layers.Embedding(config["type_vocab_size"], hidden,
                             name=_name("embeddings/type_embeddings"))(inputs["input_type_ids"])
    x = PositionTable(name=_name("embeddings/position_embeddings"))(word + types)
    x = layers.LayerNormalization(epsilon=epsilon, name=_name("embeddings/layer_norm"))(x)
    for i in range(config["num_layers"]):
        prefix = f"transformer/layer_{i}"
        q = layers.Dense(heads * head_size, name=_name(f"{prefix}/attention/query"))(x)
        k = layers.Dense(heads * head_size, name=_name(f"{prefix}/attention/key"))(x)
        v = layers.Dense(heads * head_size, name=_name(f"{prefix}/attention/value"))(x)
        context = Attention(name=_name(f"{prefix}/attention/core"))(q, k, v, mask)
        attention = layers.Dense(hidden, name=_name(f"{prefix}/attention/output"))(context)
        x = layers.LayerNormalization(epsilon=epsilon,
                                      name=_name(f"{prefix}/attention/layer_norm"))(x + attention)
        h = layers.Dense(config["intermediate_size"], activation=activation,
                         name=_name(f"{prefix}/ffn/intermediate"))(x)
        h = layers.Dense(hidden, name=_name(f"{prefix}/ffn/output"))(h)
        x = layers.LayerNormalization(epsilon=epsilon,
                                      name=_name(f"{prefix}/ffn/layer_norm"))(x + h)
    if config["pooling"] == "mean":
        features = MeanPooling(name="classifier__mean_pooling")(x, mask)
    else:
        features = layers.Dense(hidden, activation="tanh", name="pooler")(x[:, 0, :])
    logits = layers.Dense(config["num_classes"], name=_name("classifier/logits"))(features)
    return keras.Model(inputs, logits, name="bert_classifier_keras3")


def load_weights(model, arrays):
    """Set each layer's weights from ``arrays`` keys ``<tf_keras layer name>::<index>``."""
    loaded = 0
    for layer in model.layers:
        if not layer.weights:
            continue
        name = layer.name.replace(SEPARATOR, "/")
        values = [arrays[f"{name}::{i}"] for i in range(len(layer.weights))]
        layer.set_weights(values)
        loaded += len(values)
    return loaded


def _folder_bytes(path):
    import gzip

    with open(path, "rb") as f:
        content = f.read()
    return len(content), len(gzip.compress(content, compresslevel=9))


def main(argv):
    weights_path, config_path, out = argv
    import keras

    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    with np.load(weights_path) as stored:
        arrays = {k: stored[k] for k in stored.files}
    model = build_classifier(config)
    loaded = load_weights(model, arrays)

    check_inputs = {n: arrays[f"check::{n}"] for n in INPUT_NAMES}
    float_logits = np.asarray(model.predict(check_inputs, verbose=0))
    float_diff = float(np.max(np.abs(float_logits - arrays["check::logits"])))
    float_path = os.path.join(out, "keras3_float32.keras")
    model.save(float_path)

    model.quantize("int8")
    int8_path = os.path.join(out, "keras3_int8.keras")
    model.save(int8_path)
    test_inputs = {n: arrays[f"test::{n}"] for n in INPUT_NAMES}
    logits = np.asarray(model.predict(test_inputs, batch_size=64, verbose=0))
    logits_path = os.path.join(out, "keras3_int8_test_logits.npy")
    np.save(logits_path, logits)
    float_bytes, float_gzip = _folder_bytes(float_path)
    int8_bytes, int8_gzip = _folder_bytes(int8_path)
    print(json.dumps({
        "keras": keras.__version__,
        "weights_loaded": loaded,
        "float_max_abs_diff": float_diff,
        "float32_bytes": float_bytes, "float32_gzip_bytes": float_gzip,
        "bytes": int8_bytes, "gzip_bytes": int8_gzip,
        "test_logits": logits_path,
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
