"""Learning-rate schedule of BERT fine-tuning: linear warmup, then linear decay to zero."""

from tfcompress._keras import keras, tf


@keras.utils.register_keras_serializable(package="tfcompress")
class WarmupLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """``lr(step) = peak * step / warmup`` while ``step < warmup``, then
    ``peak * (total - step) / (total - warmup)``, and 0 from ``total`` on.

    Args:
      peak_learning_rate: the rate reached at the end of warmup.
      total_steps: optimizer steps of the whole run.
      warmup_steps: steps of the linear ramp from 0, at most ``total_steps``.
    """

    def __init__(self, peak_learning_rate, total_steps, warmup_steps):
        if not peak_learning_rate > 0:
            raise ValueError(
                f"peak_learning_rate must be positive; received {peak_learning_rate!r}.")
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer; received {total_steps!r}.")
        if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
            raise ValueError(
                f"warmup_steps must be an integer in [0, total_steps={total_steps}]; "
                f"received {warmup_steps!r}.")
        self.peak_learning_rate = float(peak_learning_rate)
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        peak = tf.constant(self.peak_learning_rate, tf.float32)
        # max(..., 1) keeps the divisions finite when warmup or decay has zero length.
        warmup = peak * step / max(self.warmup_steps, 1)
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        decay = peak * (self.total_steps - step) / decay_steps
        rate = tf.where(step < self.warmup_steps, warmup, decay)
        return tf.maximum(rate, 0.0)

    def get_config(self):
        return {"peak_learning_rate": self.peak_learning_rate, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps}
