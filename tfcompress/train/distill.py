"""Knowledge distillation from a frozen teacher, trained with ``Model.fit``.

Loss (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015), per example:

    (1 - alpha) * CE(y, s) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))
      + hidden_mse_weight * mean_j MSE(W_j h_s[j], h_t[m(j)])

where s and t are the student and teacher logits, T the temperature (T^2 keeps the
gradient scale of the soft term independent of T), h_s[j] the output of student block j,
h_t[m(j)] the teacher block it is matched to (m(j) = round((j + 1) * L_t / L_s) - 1, a
uniform map from L_s student to L_t teacher blocks), and W_j a trained linear map when
the widths differ (identity otherwise).

The teacher is held outside Keras' object tracking: it is never in the distiller's or
the student's checkpoints and saved models, and none of its variables are trained.
"""

import logging

from tfcompress._keras import keras, tf
from tfcompress.train.blocks import extract_blocks

logger = logging.getLogger(__name__)


class _Untracked:
    """A reference that Keras' attribute tracking does not follow."""

    def __init__(self, value):
        self.value = value


def _block_outputs(model):
    return [block.output for block in extract_blocks(model)]


def check_distill_args(alpha, temperature, hidden_mse_weight):
    """Raise ValueError on distillation weights outside their ranges."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distill_alpha must be in [0, 1]; received {alpha!r}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive; received {temperature!r}.")
    if not hidden_mse_weight >= 0:
        raise ValueError(f"hidden_mse_weight must be >= 0; received {hidden_mse_weight!r}.")


class Distiller(keras.Model):
    """A trainable wrapper that fits ``student`` to labels and to a frozen ``teacher``.

    ``compile`` it with an optimizer and metrics (the loss is built in); ``fit`` takes
    the same ``(inputs, labels)`` data as the student. Save ``distiller.student``, not
    the distiller.

    Args:
      student: the model being trained; maps inputs to [batch, classes] logits.
      teacher: a model with the same inputs and output shape; only called, never trained.
      alpha: weight of the soft (teacher) term, in [0, 1].
      temperature: softening temperature T > 0.
      hidden_mse_weight: weight of the hidden-state MSE; 0 turns it off. Both models
        must then be flat tfcompress classifiers or encoders with transformer blocks.
    """

    def __init__(self, student, teacher, alpha=0.5, temperature=2.0, hidden_mse_weight=0.0,
                 **kwargs):
        super().__init__(**kwargs)
        check_distill_args(alpha, temperature, hidden_mse_weight)
        self.student = student
        self._teacher = _Untracked(teacher)
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.hidden_mse_weight = float(hidden_mse_weight)
        self._ce = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=keras.losses.Reduction.NONE)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.student_features = None
        self.projections = []
        self._teacher_features = None
        if self.hidden_mse_weight > 0:
            self._build_hidden_matching(student, teacher)

    @property
    def teacher(self):
        return self._teacher.value

    def _build_hidden_matching(self, student, teacher):
        student_hidden = _block_outputs(student)
        teacher_hidden = _block_outputs(teacher)
        self.student_features = keras.Model(student.input, [student.output, *student_hidden],
                                            name="student_features")
        self._teacher_features = _Untracked(keras.Model(
            teacher.input, [teacher.output, *teacher_hidden], name="teacher_features"))
        count_s, count_t = len(student_hidden), len(teacher_hidden)
        self._matches = [round((j + 1) * count_t / count_s) - 1 for j in range(count_s)]
        for j, k in enumerate(self._matches):
            width_s, width_t = student_hidden[j].shape[-1], teacher_hidden[k].shape[-1]
            if width_s == width_t:
                self.projections.append(None)
            else:
                self.projections.append(keras.layers.Dense(
                    width_t, use_bias=False, dtype="float32", name=f"hidden_map_{j}"))
        logger.info("Hidden-state distillation: student block j -> teacher block %s.",
                    self._matches)

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    @property
    def metrics(self):
        return [self.loss_tracker] + self.compiled_metrics.metrics

    def _loss(self, labels, student_logits, teacher_logits, student_hidden, teacher_hidden):
        student_logits = tf.cast(student_logits, tf.float32)
        teacher_logits = tf.cast(teacher_logits, tf.float32)
        per_example = (1.0 - self.alpha) * self._ce(labels, student_logits)

        t = self.temperature
        teacher_probs = tf.nn.softmax(teacher_logits / t)
        # KL(p || q) = sum p (log p - log q); log_softmax keeps both logs finite.
        kl = tf.reduce_sum(
            teacher_probs * (tf.nn.log_softmax(teacher_logits / t)
                             - tf.nn.log_softmax(student_logits / t)), axis=-1)
        per_example += self.alpha * t * t * kl

        for j, k in enumerate(self._matches if self.hidden_mse_weight > 0 else []):
            h_s = tf.cast(student_hidden[j], tf.float32)
            if self.projections[j] is not None:
                h_s = self.projections[j](h_s)
            h_t = tf.cast(teacher_hidden[k], tf.float32)
            mse = tf.reduce_mean(tf.square(h_s - h_t), axis=list(range(1, len(h_s.shape))))
            per_example += self.hidden_mse_weight * mse / len(self._matches)
        # Divides by the global batch size under a distribution strategy.
        return tf.nn.compute_average_loss(per_example)

    def _forward(self, x, training):
        if self.hidden_mse_weight > 0:
            teacher_out = self._teacher_features.value(x, training=False)
            student_out = self.student_features(x, training=training)
            return student_out[0], teacher_out[0], student_out[1:], teacher_out[1:]
        return self.student(x, training=training), self.teacher(x, training=False), [], []

    def train_step(self, data):
        x, y = data[0], data[1]
        with tf.GradientTape() as tape:
            student_logits, teacher_logits, h_s, h_t = self._forward(x, training=True)
            teacher_logits = tf.stop_gradient(teacher_logits)
            h_t = [tf.stop_gradient(h) for h in h_t]
            loss = self._loss(y, student_logits, teacher_logits, h_s, h_t)
        # minimize() applies loss scaling when the optimizer is a LossScaleOptimizer.
        self.optimizer.minimize(loss, self.trainable_variables, tape=tape)
        return self._update_metrics(loss, y, student_logits)

    def test_step(self, data):
        x, y = data[0], data[1]
        student_logits, teacher_logits, h_s, h_t = self._forward(x, training=False)
        loss = self._loss(y, student_logits, teacher_logits, h_s, h_t)
        return self._update_metrics(loss, y, student_logits)

    def _update_metrics(self, loss, labels, logits):
        # compute_average_loss divided by the global batch; undo the per-replica share.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        self.loss_tracker.update_state(loss * replicas)
        self.compiled_metrics.update_state(labels, logits)
        return {m.name: m.result() for m in self.metrics}
