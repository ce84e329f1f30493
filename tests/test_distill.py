"""Tests of distillation: the loss formula, frozen teacher, saved student."""

import numpy as np
import pytest

from conftest import random_inputs
from tfcompress._keras import keras, tf
from tfcompress.bert import BertConfig, build_encoder, classifier
from tfcompress.train import Distiller, fine_tune


def _logit_model(values):
    inputs = keras.Input((1,))
    layer = keras.layers.Dense(len(values), use_bias=True, kernel_initializer="zeros",
                               bias_initializer=keras.initializers.Constant(values))
    return keras.Model(inputs, layer(inputs))


def test_loss_matches_hand_computation():
    student, teacher = _logit_model([0.0, 0.0]), _logit_model([np.log(3.0), 0.0])
    distiller = Distiller(student, teacher, alpha=0.5, temperature=1.0)
    s = student(np.zeros((1, 1), np.float32))
    t = teacher(np.zeros((1, 1), np.float32))
    loss = float(distiller._loss(np.array([0]), s, t, [], []))
    # CE = ln 2; teacher probs (3/4, 1/4), student (1/2, 1/2):
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2).
    kl = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
    np.testing.assert_allclose(loss, 0.5 * np.log(2) + 0.5 * kl, rtol=1e-6)


def test_rejects_bad_alpha():
    with pytest.raises(ValueError, match=r"distill_alpha must be in \[0, 1\]; received 2"):
        Distiller(_logit_model([0.0]), _logit_model([0.0]), alpha=2)


@pytest.mark.slow
def test_distilled_student_saves_without_teacher(tiny_config, tmp_path):
    student = classifier(build_encoder(tiny_config), 3, dropout=0.0)
    wide = BertConfig(vocab_size=100, hidden_size=48, num_layers=4, num_heads=4,
                      intermediate_size=64, max_position_embeddings=64, dropout_rate=0.0,
                      attention_dropout_rate=0.0)
    teacher = classifier(build_encoder(wide, name="teacher"), 3, dropout=0.0,
                         name="teacher_classifier")
    teacher_before = [w.copy() for w in teacher.get_weights()]
    x = random_inputs(batch=8, seq=16)
    data = tf.data.Dataset.from_tensor_slices((x, np.zeros(8, np.int32))).batch(4)

    history = fine_tune(student, data, teacher=teacher, hidden_mse_weight=1.0,
                        learning_rate=1e-3, verbose=0)
    assert history.history["loss"][0] > 0
    assert teacher.trainable
    for a, b in zip(teacher_before, teacher.get_weights()):
        np.testing.assert_array_equal(a, b)

    path = str(tmp_path / "student")
    student.save(path, save_format="tf")
    loaded = tf.saved_model.load(path)
    assert len(loaded.variables) == len(student.weights)
    shapes = {tuple(v.shape) for v in loaded.variables}
    assert (48,) not in shapes  # the teacher's LayerNorm and bias width
