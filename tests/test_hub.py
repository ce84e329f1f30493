import json
import os

import numpy as np
import pytest
import tensorflow_hub as hub

from conftest import random_inputs
from tfcompress._keras import keras, tf
from tfcompress.bert import BertConfig, build_encoder, encoder_config, export_hub, from_hub

# Both sides compute in float32; einsum and matmul sum in different orders, which moves
# LayerNorm outputs by about 1e-6.
TOLERANCE = 1e-5

HUB_NAMES_PER_BLOCK = [
    "self_attention/query/kernel", "self_attention/query/bias",
    "self_attention/key/kernel", "self_attention/key/bias",
    "self_attention/value/kernel", "self_attention/value/bias",
    "self_attention/attention_output/kernel", "self_attention/attention_output/bias",
    "self_attention_layer_norm/gamma", "self_attention_layer_norm/beta",
    "intermediate/kernel", "intermediate/bias", "output/kernel", "output/bias",
    "output_layer_norm/gamma", "output_layer_norm/beta",
]


def _write_vocab(path, size):
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"token{i}" for i in range(size - 4)]
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny encoder (vocab 100, hidden 32, 2 blocks, 4 heads) and its export."""
    keras.utils.set_random_seed(7)
    config = BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64, max_position_embeddings=64,
                        dropout_rate=0.0, attention_dropout_rate=0.0)
    encoder = build_encoder(config)
    root = tmp_path_factory.mktemp("hub")
    vocab = _write_vocab(root / "vocab.txt", 100)
    folder = export_hub(encoder, str(root / "encoder"), vocab_file=vocab)
    return encoder, folder


def _max_difference(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_export_keras_layer_outputs(exported):
    encoder, folder = exported
    inputs = random_inputs(batch=3, seq=12, pad_from=7)
    expected = encoder(inputs)
    layer = hub.KerasLayer(folder, trainable=True)
    outputs = layer(inputs)
    assert _max_difference(outputs["sequence_output"], expected["sequence_output"]) < TOLERANCE
    assert _max_difference(outputs["pooled_output"], expected["pooled_output"]) < TOLERANCE
    assert _max_difference(outputs["default"], expected["pooled_output"]) < TOLERANCE
    assert len(outputs["encoder_outputs"]) == 2
    for ours, theirs in zip(outputs["encoder_outputs"], expected["encoder_outputs"]):
        assert _max_difference(ours, theirs) < TOLERANCE


def test_export_signature_outputs(exported):
    encoder, folder = exported
    inputs = random_inputs(batch=2, seq=9, pad_from=5)
    layer = hub.KerasLayer(folder, signature="serving_default",
                           signature_outputs_as_dict=True)
    outputs = layer(inputs)
    assert sorted(outputs) == ["default", "encoder_outputs_0", "encoder_outputs_1",
                               "pooled_output", "sequence_output"]
    expected = encoder(inputs)
    assert _max_difference(outputs["sequence_output"], expected["sequence_output"]) < TOLERANCE
    assert _max_difference(outputs["encoder_outputs_0"],
                           expected["encoder_outputs"][0]) < TOLERANCE


def test_export_variable_names_and_shapes(exported):
    _, folder = exported
    loaded = tf.saved_model.load(folder)
    shapes = {v.name[:-2]: tuple(v.shape) for v in loaded.variables}
    expected = {
        "word_embeddings/embeddings": (100, 32),
        "position_embedding/embeddings": (64, 32),
        "type_embeddings/embeddings": (2, 32),
        "embeddings/layer_norm/gamma": (32,),
        "embeddings/layer_norm/beta": (32,),
        "pooler_transform/kernel": (32, 32),
        "pooler_transform/bias": (32,),
    }
    block_shapes = [(32, 4, 8), (4, 8)] * 3 + [(4, 8, 32), (32,), (32,), (32,),
                                               (32, 64), (64,), (64, 32), (32,), (32,), (32,)]
    for i in range(2):
        for part, shape in zip(HUB_NAMES_PER_BLOCK, block_shapes):
            expected[f"transformer/layer_{i}/{part}"] = shape
    assert shapes == expected
    assert len(loaded.trainable_variables) == 39
    assert sorted(os.listdir(os.path.join(folder, "assets"))) == [
        "tfcompress_bert_config.json", "vocab.txt"]
    assert list(loaded.signatures) == ["serving_default"]


def test_keras_layer_fine_tuning_changes_variables(exported):
    _, folder = exported
    inputs = {name: keras.Input(shape=(None,), dtype=tf.int32, name=name)
              for name in ("input_word_ids", "input_mask", "input_type_ids")}
    layer = hub.KerasLayer(folder, trainable=True)
    logits = keras.layers.Dense(3)(layer(inputs)["pooled_output"])
    model = keras.Model(inputs, logits)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert len(layer.trainable_weights) == 39

    query = next(w for w in layer.trainable_weights
                 if w.name.startswith("transformer/layer_0/self_attention/query/kernel"))
    words = next(w for w in layer.trainable_weights
                 if w.name.startswith("word_embeddings/embeddings"))
    before_query, before_words = query.numpy().copy(), words.numpy().copy()
    data = random_inputs(batch=8, seq=10, pad_from=8, seed=3)
    labels = np.arange(8) % 3
    history = model.fit(data, labels, epochs=3, batch_size=8, verbose=0)

    # Adam moves every weight with a nonzero gradient by about the learning rate per step.
    assert _max_difference(query.numpy(), before_query) > 1e-3
    assert _max_difference(words.numpy(), before_words) > 1e-3
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_from_hub_round_trip(exported):
    encoder, folder = exported
    rebuilt = from_hub(folder, name="rebuilt")
    assert rebuilt.name == "rebuilt"
    assert encoder_config(rebuilt) == encoder_config(encoder)
    inputs = random_inputs(batch=2, seq=20, pad_from=11, seed=5)
    expected, outputs = encoder(inputs), rebuilt(inputs)
    assert _max_difference(outputs["sequence_output"], expected["sequence_output"]) < TOLERANCE
    assert _max_difference(outputs["pooled_output"], expected["pooled_output"]) < TOLERANCE


def test_from_hub_round_trip_pruned_shapes(tmp_path):
    config = BertConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64, max_position_embeddings=32,
                        hidden_act="gelu_approximate", layer_norm_eps=1e-6,
                        layer_heads=(4, 2), layer_intermediate_sizes=(64, 40),
                        dropout_rate=0.0, attention_dropout_rate=0.0)
    encoder = build_encoder(config)
    folder = export_hub(encoder, tmp_path / "pruned")
    shapes = {v.name[:-2]: tuple(v.shape) for v in tf.saved_model.load(folder).variables}
    assert shapes["transformer/layer_1/self_attention/query/kernel"] == (32, 2, 8)
    assert shapes["transformer/layer_1/self_attention/attention_output/kernel"] == (2, 8, 32)
    assert shapes["transformer/layer_1/intermediate/kernel"] == (32, 40)

    rebuilt = from_hub(folder)
    assert encoder_config(rebuilt) == config
    inputs = random_inputs(batch=2, seq=10, vocab=50, pad_from=6)
    assert _max_difference(rebuilt(inputs)["sequence_output"],
                           encoder(inputs)["sequence_output"]) < TOLERANCE


def test_from_hub_output_mismatch(tmp_path):
    config = BertConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                        intermediate_size=32, max_position_embeddings=32,
                        dropout_rate=0.0, attention_dropout_rate=0.0)
    folder = export_hub(build_encoder(config), tmp_path / "encoder")
    # A config asset that claims another activation makes the rebuilt encoder differ.
    asset = os.path.join(folder, "assets", "tfcompress_bert_config.json")
    with open(asset, encoding="utf-8") as f:
        saved = json.load(f)
    saved["hidden_act"] = "relu"
    with open(asset, "w", encoding="utf-8") as f:
        json.dump(saved, f)
    with pytest.raises(ValueError, match=r"relu: sequence_output differs by up to"):
        from_hub(folder)


def test_export_refuses_existing_folder(exported, tmp_path):
    encoder, _ = exported
    target = tmp_path / "model"
    target.mkdir()
    (target / "mine.txt").write_text("keep", encoding="utf-8")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_hub(encoder, target)
    assert os.listdir(target) == ["mine.txt"]

    export_hub(encoder, target, overwrite=True)
    assert sorted(os.listdir(target)) == ["assets", "fingerprint.pb", "saved_model.pb",
                                          "variables"]
    # No staging or backup folder is left beside the result.
    assert os.listdir(tmp_path) == ["model"]


def test_export_vocab_size_mismatch(exported, tmp_path):
    encoder, _ = exported
    vocab = _write_vocab(tmp_path / "vocab.txt", 60)
    with pytest.raises(ValueError, match=r"has 60 tokens but the word embedding table .* has 100 rows"):
        export_hub(encoder, tmp_path / "out", vocab_file=vocab)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_from_hub_model_garden_encoder(tmp_path):
    """Import a BertEncoder exported by TF Model Garden's own TF-Hub exporter.

    The exporter fails on BertEncoderV2 under TensorFlow 2.21 and Python 3.11 (saving a
    model whose inputs are a dict raises "this __dict__ descriptor does not support
    '_DictWrapper' objects"), so this uses BertEncoder, which has the same variable names.
    """
    export_lib = pytest.importorskip(
        "official.nlp.tools.export_tfhub_lib",
        reason="needs tf-models-official: pip install --no-deps tf-models-official==2.20.0 "
               "gin-config")
    from official.nlp.configs import encoders

    encoder_cfg = encoders.EncoderConfig(type="bert", bert=encoders.BertEncoderConfig(
        vocab_size=100, hidden_size=32, num_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
        dropout_rate=0.0, attention_dropout_rate=0.0))
    garden_encoder = encoders.build_encoder(encoder_cfg)
    assert type(garden_encoder).__name__ == "BertEncoder"
    assert len(garden_encoder.trainable_variables) == 39
    # Random initial weights are small; larger ones make a wrong mapping show.
    for variable in garden_encoder.trainable_variables:
        variable.assign(tf.random.stateless_normal(variable.shape, seed=[1, 2]) * 0.3)
    checkpoint = tf.train.Checkpoint(encoder=garden_encoder).save(str(tmp_path / "ckpt" / "c"))
    vocab = _write_vocab(tmp_path / "vocab.txt", 100)
    folder = str(tmp_path / "garden")
    export_lib.export_model(folder, encoder_config=encoder_cfg,
                            model_checkpoint_path=checkpoint, with_mlm=False,
                            vocab_file=vocab, do_lower_case=True)

    rebuilt = from_hub(folder)
    config = encoder_config(rebuilt)
    assert (config.num_layers, config.hidden_size, config.num_heads) == (2, 32, 4)
    assert (config.intermediate_size, config.vocab_size) == (64, 100)
    # Model Garden's "gelu" is the tanh approximation.
    assert config.hidden_act == "gelu_approximate"

    inputs = random_inputs(batch=2, seq=12, pad_from=8, seed=9)
    inputs["input_type_ids"][:, 4:] = 1
    expected = tf.saved_model.load(folder)(
        {k: tf.constant(v) for k, v in inputs.items()}, training=False)
    outputs = rebuilt(inputs)
    assert _max_difference(outputs["sequence_output"], expected["sequence_output"]) < TOLERANCE
    assert _max_difference(outputs["pooled_output"], expected["pooled_output"]) < TOLERANCE
