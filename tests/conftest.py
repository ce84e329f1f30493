"""Shared fixtures: global Keras state reset, tiny BERT configs, the embedded model."""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tfcompress._keras import keras, tf  # noqa: E402

# The peer reference outputs are kept beside the tests so a clone is self-contained.
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(autouse=True)
def reset_keras_state():
    """Reset the precision policy, seeds and Keras name counters around every test."""
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(1234)
    yield
    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()


@pytest.fixture
def tiny_config():
    from tfcompress.bert import BertConfig

    return BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                      intermediate_size=64, max_position_embeddings=64,
                      dropout_rate=0.0, attention_dropout_rate=0.0)


@pytest.fixture
def tiny_encoder(tiny_config):
    from tfcompress.bert import build_encoder

    return build_encoder(tiny_config)


def random_inputs(batch=2, seq=16, vocab=100, seed=0, pad_from=None):
    """Random encoder inputs; rows are padded from position ``pad_from`` on when given."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(batch, seq)).astype(np.int32)
    mask = np.ones((batch, seq), np.int32)
    if pad_from is not None:
        mask[:, pad_from:] = 0
        ids[:, pad_from:] = 0
    types = np.zeros((batch, seq), np.int32)
    return {"input_word_ids": ids, "input_mask": mask, "input_type_ids": types}


@pytest.fixture(scope="session")
def reference():
    return np.load(os.path.join(FIXTURES, "minilm_reference_public.npz"))


@pytest.fixture(scope="session")
def minilm():
    from tfcompress.bert import load_minilm

    return load_minilm()
