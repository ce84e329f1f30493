"""Errors the bert package raises on bad input, checked for the value and the fix they name."""

import json

import numpy as np
import pytest

from tfcompress._keras import check_model, keras, tf
from tfcompress.bert import check_vocab, classifier, from_hub, from_huggingface
from tfcompress.text import BertPreprocessor


class _Linear(tf.Module):
    def __init__(self):
        super().__init__()
        self.kernel = tf.Variable(tf.ones([4, 2]), name="dense/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def __call__(self, x):
        return tf.matmul(x, self.kernel)


@pytest.fixture(scope="module")
def linear_saved_model(tmp_path_factory):
    """A SavedModel with one [4, 2] variable: callable, but not a BERT encoder."""
    folder = str(tmp_path_factory.mktemp("linear") / "model")
    module = _Linear()
    tf.saved_model.save(module, folder, signatures={"serving_default": module.__call__})
    return folder


def _write_vocab(path, size):
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"token{i}" for i in range(size - 4)]
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return str(path)


def test_from_hub_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"SavedModel folder not found: .*nowhere"):
        from_hub(missing)


def test_from_hub_folder_without_saved_model(tmp_path):
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no saved_model\.pb \(found \['notes\.txt'\]\)"):
        from_hub(tmp_path)


def test_from_hub_not_bert_encoder(linear_saved_model):
    with pytest.raises(ValueError) as error:
        from_hub(linear_saved_model)
    message = str(error.value)
    assert "not a TF-Hub BERT encoder" in message
    assert "Signatures found: ['serving_default']" in message
    assert "variables found: dense/kernel." in message
    assert "word_embeddings/embeddings" in message


def test_from_hub_url_offline(monkeypatch):
    import tensorflow_hub as hub

    def unreachable(handle):
        raise OSError("network is unreachable")

    monkeypatch.setattr(hub, "resolve", unreachable)
    url = "https://tfhub.dev/tensorflow/bert_en_uncased_L-12_H-768_A-12/4"
    with pytest.raises(OSError) as error:
        from_hub(url)
    message = str(error.value)
    assert url in message
    assert "network is unreachable" in message
    assert "needs network access" in message
    assert "local folder" in message


def _hf_folder(folder, wrong_shape_tensor=None):
    """Write a 1-block Hugging Face BERT folder (vocab 20, hidden 8, FFN 16)."""
    from safetensors.numpy import save_file

    config = {"vocab_size": 20, "hidden_size": 8, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 16,
              "max_position_embeddings": 12, "type_vocab_size": 2}
    shapes = {
        "embeddings.word_embeddings.weight": (20, 8),
        "embeddings.position_embeddings.weight": (12, 8),
        "embeddings.token_type_embeddings.weight": (2, 8),
        "embeddings.LayerNorm.weight": (8,), "embeddings.LayerNorm.bias": (8,),
        "pooler.dense.weight": (8, 8), "pooler.dense.bias": (8,),
    }
    prefix = "encoder.layer.0"
    for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense"):
        shapes[f"{prefix}.{part}.weight"] = (8, 8)
        shapes[f"{prefix}.{part}.bias"] = (8,)
    shapes[f"{prefix}.intermediate.dense.weight"] = (16, 8)
    shapes[f"{prefix}.intermediate.dense.bias"] = (16,)
    shapes[f"{prefix}.output.dense.weight"] = (8, 16)
    shapes[f"{prefix}.output.dense.bias"] = (8,)
    for part in ("attention.output.LayerNorm", "output.LayerNorm"):
        shapes[f"{prefix}.{part}.weight"] = (8,)
        shapes[f"{prefix}.{part}.bias"] = (8,)
    if wrong_shape_tensor:
        name, shape = wrong_shape_tensor
        shapes[name] = shape
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    save_file({k: np.zeros(v, np.float32) for k, v in shapes.items()},
              str(folder / "model.safetensors"))
    return folder


def test_huggingface_shape_mismatch(tmp_path):
    # A 12-wide FFN where config.json sets intermediate_size=16.
    folder = _hf_folder(tmp_path / "hf", ("encoder.layer.0.intermediate.dense.weight", (12, 8)))
    with pytest.raises(ValueError) as error:
        from_huggingface(folder)
    message = str(error.value)
    assert "config.json and model.safetensors" in message
    assert "encoder.layer.0.intermediate.dense.weight has shape [12, 8]" in message
    assert "config.json implies [16, 8]" in message
    assert "Use the config.json that was saved with these weights" in message


def test_huggingface_consistent_folder_loads(tmp_path):
    # The same writer without the wrong tensor loads, so the error above is the shape's.
    encoder = from_huggingface(_hf_folder(tmp_path / "hf"))
    assert encoder.count_params() == (20 + 12 + 2) * 8 + 2 * 8 + 4 * (8 * 8 + 8) + \
        (8 * 16 + 16) + (16 * 8 + 8) + 2 * 2 * 8 + (8 * 8 + 8)


def test_check_vocab_mismatch(tmp_path, tiny_encoder):
    vocab = _write_vocab(tmp_path / "vocab.txt", 60)
    with pytest.raises(ValueError) as error:
        check_vocab(vocab, tiny_encoder)
    message = str(error.value)
    assert "has 60 tokens" in message
    assert "has 100 rows" in message
    assert "Use the vocab file the encoder was trained with" in message

    preprocessor = BertPreprocessor(vocab, seq_length=8)
    with pytest.raises(ValueError, match=r"preprocessor's vocabulary has 60 tokens .* 100 rows"):
        check_vocab(preprocessor, tiny_encoder)


def test_check_vocab_match(tmp_path, tiny_encoder):
    vocab = _write_vocab(tmp_path / "vocab.txt", 100)
    assert check_vocab(vocab, tiny_encoder) == 100
    assert check_vocab(BertPreprocessor(vocab, seq_length=8), tiny_encoder) == 100


def test_check_vocab_missing_file(tmp_path, tiny_encoder):
    with pytest.raises(FileNotFoundError, match=r"vocab file not found: .*absent\.txt"):
        check_vocab(tmp_path / "absent.txt", tiny_encoder)


def test_classifier_rejects_keras3_model():
    keras3 = pytest.importorskip("keras")
    if not keras3.__version__.startswith("3"):
        pytest.skip(f"the importable keras is {keras3.__version__}, not Keras 3")
    model = keras3.Sequential([keras3.Input((4,)), keras3.layers.Dense(2)])
    with pytest.raises(TypeError) as error:
        classifier(model, num_classes=3)
    message = str(error.value)
    assert "encoder is a Keras 3 object" in message
    assert "import tf_keras as keras" in message


def test_check_model_rejects_hub_layer(linear_saved_model):
    import tensorflow_hub as hub

    inputs = keras.Input(shape=(4,))
    outputs = hub.KerasLayer(linear_saved_model, name="linear_hub")(inputs)
    model = keras.Model(inputs, outputs)
    with pytest.raises(TypeError) as error:
        check_model(model)
    message = str(error.value)
    assert "hub.KerasLayer 'linear_hub'" in message
    assert "tfcompress.bert.from_hub" in message
    assert check_model(model, allow_hub_layer=True) is model


def test_huggingface_config_with_fewer_layers(tmp_path):
    from safetensors.numpy import save_file

    from tfcompress.bert import BertConfig, build_encoder
    from tfcompress.bert.huggingface import _weight_map

    config = BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    encoder = build_encoder(config)
    layers = {layer.name: layer for layer in encoder.layers}
    tensors = {}
    for (layer_name, index), (tensor_name, transpose) in _weight_map(config).items():
        value = layers[layer_name].weights[index].numpy()
        tensors[tensor_name] = value.T.copy() if transpose else value
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32}))
    with pytest.raises(ValueError, match="num_hidden_layers=1"):
        from_huggingface(str(tmp_path))
