"""Tests of block-wise training against a teacher encoder."""

import numpy as np
import pytest

from conftest import random_inputs
from tfcompress.bert import BertConfig, build_encoder
from tfcompress.memory import estimate
from tfcompress.train import extract_blocks, train_blockwise


def test_blockwise_lowers_block_losses(tiny_config):
    teacher = build_encoder(tiny_config, name="teacher")
    student = build_encoder(tiny_config, name="student")
    student.set_weights(teacher.get_weights())
    # Perturb the student's blocks so there is something to learn back.
    for layer in student.layers:
        if layer.name.startswith("transformer/") and layer.name.endswith("/intermediate"):
            kernel = layer.kernel.numpy()
            layer.kernel.assign(kernel + np.random.default_rng(0).normal(0, 0.05, kernel.shape))
    inputs = random_inputs(batch=32, seq=16, pad_from=12)

    result = train_blockwise(student, teacher, inputs, epochs=5, learning_rate=1e-3,
                             batch_size=8, end_to_end_epochs=1, end_to_end_learning_rate=1e-5)
    assert len(result.losses_before) == 2
    for before, after in zip(result.losses_before, result.losses_after):
        assert after < before
    assert result.end_to_end_after < result.end_to_end_before


def test_blockwise_rejects_depth_mismatch(tiny_config):
    deeper = BertConfig(**{**tiny_config.to_dict(), "num_layers": 3})
    with pytest.raises(ValueError, match="the student has 2 transformer blocks and the teacher 3"):
        train_blockwise(build_encoder(tiny_config), build_encoder(deeper), random_inputs())


def test_blockwise_estimate_below_whole_model(tiny_encoder):
    whole = estimate(tiny_encoder, batch_size=8, seq_length=16)
    block = estimate(extract_blocks(tiny_encoder)[0].model, batch_size=8, seq_length=16)
    assert block.weights < whole.weights
    assert block.activations < whole.activations
    assert block.total < whole.total / 2
