"""Fine-tune a classifier with Keras ``fit``: AdamW, warmup, precision, resume, distillation.

What this adds to ``Model.fit``: the BERT recipe (AdamW with decoupled weight decay
that skips biases and LayerNorm, linear warmup then linear decay), a precision policy
that really reaches a model built earlier (see ``precision.rebuild``), per-block
recomputation, a frozen teacher, a NaN/Inf guard naming the step, and exact resume
after a crash.

Resume: ``keras.callbacks.BackupAndRestore`` writes a ``tf.train.CheckpointManager``
checkpoint of the model, the optimizer (slots and step), the epoch and the batch to
``checkpoint_dir/chief``. On restart ``fit`` resumes at that epoch and batch, and
``fine_tune`` skips the dataset to the same place: the training data is read as one
pass over ``train_ds.repeat(epochs)``, so epoch ``e`` sees the ``e``-th reshuffle of a
seeded ``shuffle``, and ``skip(steps_done)`` lands on the next unseen batch. Weights
then match an uninterrupted run when ops are deterministic (``fine_tune`` enables
``tf.config.experimental.enable_op_determinism`` for checkpointed runs) and dropout is
off; dropout draws from a stateful generator that restarts with the process. The
backup is deleted when training ends normally, kept when it fails.

Distribution: pass ``strategy`` (``tf.distribute.MirroredStrategy`` for the GPUs of one
host). The model (and the teacher) are rebuilt inside ``strategy.scope()`` and their
weights copied back afterwards; batches of ``train_ds`` are global batches. For several
hosts, build a ``tf.distribute.MultiWorkerMirroredStrategy`` from ``TF_CONFIG`` on
every worker and call ``fine_tune`` with the same arguments everywhere; checkpoints are
written by the chief. For TPUs, pass a ``tf.distribute.TPUStrategy`` and use
``precision="mixed_bfloat16"`` (TPUs have no float16 matmul) with a fixed sequence
length, because TPU programs need static shapes. Neither path is tested here: they need
hardware this test suite does not have.
"""

import contextlib
import logging
import math
import os
import warnings

from tfcompress._keras import check_model, keras, tf
from tfcompress.train import precision as precision_lib
from tfcompress.train.distill import Distiller, check_distill_args
from tfcompress.train.recompute import recompute_model
from tfcompress.train.schedule import WarmupLinearDecay

logger = logging.getLogger(__name__)

_NO_DECAY = ["bias", "layer_norm", "LayerNorm", "gamma", "beta"]


class DivergenceGuard(keras.callbacks.Callback):
    """Stop training with FloatingPointError at the first NaN or Inf loss.

    Placed before the checkpoint callback, so the step that diverged is never saved
    and the last checkpoint keeps the last finite weights.

    Args:
      steps_per_epoch: steps in one epoch, to report the global step.
      learning_rate: peak learning rate, for the message.
      precision: the precision policy name, for the message.
    """

    def __init__(self, steps_per_epoch, learning_rate, precision):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.learning_rate = learning_rate
        self.precision = precision
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)):
            return
        step = self._epoch * self.steps_per_epoch + batch + 1
        causes = [f"the learning rate (peak {self.learning_rate:g}) is likely too high; "
                  "lower it or lengthen the warmup"]
        if self.precision == "mixed_float16":
            causes.append("under mixed_float16 an activation may overflow float16 "
                          "(max 65504); try precision='mixed_bfloat16' or 'float32'")
        causes.append("or the batch contains NaN or Inf inputs")
        raise FloatingPointError(
            f"training loss is {float(loss)} at step {step} (epoch {self._epoch + 1}, batch "
            f"{batch + 1}): " + "; ".join(causes) + ". The last checkpoint, if any, holds "
            "the weights before this step.")


def _steps_per_epoch(train_ds, steps_per_epoch):
    if steps_per_epoch is not None:
        if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(
                f"steps_per_epoch must be a positive integer; received {steps_per_epoch!r}.")
        return steps_per_epoch
    cardinality = int(train_ds.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY or cardinality < 1:
        raise ValueError(
            "the number of batches in train_ds is unknown or infinite (cardinality "
            f"{cardinality}); pass steps_per_epoch, the number of batches in one epoch.")
    return cardinality


def _check_args(model, train_ds, epochs, learning_rate, weight_decay, warmup_fraction,
                checkpoint_dir, checkpoint_every, strategy, teacher):
    check_model(model)
    if not isinstance(train_ds, tf.data.Dataset):
        raise TypeError(
            "train_ds must be a tf.data.Dataset of (inputs, labels) batches; received "
            f"{type(train_ds).__name__}. Wrap arrays with tf.data.Dataset.from_tensor_slices"
            "((x, y)).batch(batch_size).")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer; received {epochs!r}.")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive; received {learning_rate!r}.")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0; received {weight_decay!r}.")
    if not 0.0 <= warmup_fraction <= 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1]; received {warmup_fraction!r}.")
    if checkpoint_every is not None and checkpoint_every != "epoch" and (
            not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(
            "checkpoint_every must be a positive number of steps or 'epoch'; received "
            f"{checkpoint_every!r}.")
    if checkpoint_every is not None and checkpoint_dir is None:
        raise ValueError(
            f"checkpoint_every={checkpoint_every!r} needs checkpoint_dir, the folder to "
            "write checkpoints to.")
    if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(
            f"strategy must be a tf.distribute.Strategy; received {type(strategy).__name__}.")
    if teacher is not None:
        check_model(teacher, "teacher")


def _steps_done(checkpoint_dir, steps_per_epoch, per_step):
    """Return the optimizer steps a BackupAndRestore checkpoint has recorded, 0 if none."""
    latest = tf.train.latest_checkpoint(os.path.join(checkpoint_dir, "chief"))
    if latest is None:
        return 0
    reader = tf.train.load_checkpoint(latest)
    epoch = int(reader.get_tensor("ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE"))
    batch = int(reader.get_tensor("ckpt_saved_batch/.ATTRIBUTES/VARIABLE_VALUE"))
    # The same arithmetic as Keras' WorkerTrainingState.maybe_load_initial_counters_from_ckpt.
    done = epoch * steps_per_epoch + batch + 1 if per_step else (epoch + 1) * steps_per_epoch
    logger.info("Resuming from %s after %d steps.", latest, done)
    return done


def _pruning_callbacks(model):
    """Return the pruning-step callback when the model holds scheduled pruning masks."""
    try:
        from tfcompress import layers as compressed
    except ImportError:
        return []
    has_scheduled = getattr(compressed, "has_scheduled_pruning", None)
    step_callback = getattr(compressed, "PruningStep", None)
    if has_scheduled is None or step_callback is None or not has_scheduled(model):
        return []
    return [step_callback()]


def _make_optimizer(learning_rate, weight_decay, warmup_fraction, total_steps, precision):
    schedule = WarmupLinearDecay(learning_rate, total_steps,
                                 int(round(warmup_fraction * total_steps)))
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=weight_decay,
                                       epsilon=1e-6)
    optimizer.exclude_from_weight_decay(var_names=_NO_DECAY)
    if precision == "mixed_float16":
        # Dynamic loss scaling: the loss is multiplied before backprop so float16
        # gradients do not underflow, and steps with Inf/NaN gradients are skipped.
        optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


def fine_tune(model, train_ds, val_ds=None, epochs=1, learning_rate=5e-5, weight_decay=0.01,
              warmup_fraction=0.1, precision="float32", recompute=False, teacher=None,
              distill_alpha=0.5, temperature=2.0, hidden_mse_weight=0.0, strategy=None,
              checkpoint_dir=None, checkpoint_every=None, tensorboard_dir=None, seed=0,
              steps_per_epoch=None, callbacks=(), verbose=1):
    """Fine-tune a classifier in place and return the Keras ``History``.

    ``model`` is trained in place: when it has to be rebuilt (for the precision policy
    or the strategy), the rebuilt copy is trained and its weights are copied back into
    ``model``, which keeps its own dtypes. ``history.model`` is ``model``.

    Args:
      model: a tf_keras classifier mapping inputs to [batch, classes] logits.
      train_ds: a ``tf.data.Dataset`` of ``(inputs, labels)`` batches, integer labels.
      val_ds: optional dataset of the same form, evaluated after each epoch.
      epochs: passes over ``train_ds``.
      learning_rate: peak learning rate after warmup.
      weight_decay: AdamW decoupled weight decay, not applied to biases and LayerNorm.
      warmup_fraction: fraction of all steps spent ramping the learning rate up from 0.
      precision: "float32", "mixed_float16" (with dynamic loss scaling) or
        "mixed_bfloat16". The global policy is restored afterwards.
      recompute: recompute each transformer block's activations in the backward pass.
      teacher: optional frozen model to distill from (see ``Distiller``).
      distill_alpha: weight of the teacher term.
      temperature: distillation temperature.
      hidden_mse_weight: weight of the hidden-state MSE to the teacher; 0 turns it off.
      strategy: optional ``tf.distribute.Strategy``.
      checkpoint_dir: folder for resumable checkpoints; a rerun with the same arguments
        continues from the last one.
      checkpoint_every: steps between checkpoints, or "epoch" (the default when
        ``checkpoint_dir`` is set).
      tensorboard_dir: optional folder for TensorBoard logs.
      seed: seed of Python, NumPy and TensorFlow random generators.
      steps_per_epoch: batches per epoch; read from ``train_ds`` when it is finite.
      callbacks: extra Keras callbacks.
      verbose: Keras progress output (0 silent, 1 progress bar, 2 one line per epoch).

    Returns:
      The ``keras.callbacks.History`` of the run, with ``history.model`` set to ``model``.

    Raises:
      FloatingPointError: when the loss becomes NaN or Inf; the message names the step.
    """
    precision_lib.check_precision(precision)
    _check_args(model, train_ds, epochs, learning_rate, weight_decay, warmup_fraction,
                checkpoint_dir, checkpoint_every, strategy, teacher)
    if teacher is not None:
        check_distill_args(distill_alpha, temperature, hidden_mse_weight)
    elif hidden_mse_weight:
        raise ValueError(
            f"hidden_mse_weight={hidden_mse_weight!r} needs a teacher; pass teacher= or "
            "set hidden_mse_weight=0.")
    steps = _steps_per_epoch(train_ds, steps_per_epoch)
    if checkpoint_dir is not None and checkpoint_every is None:
        checkpoint_every = "epoch"

    keras.utils.set_random_seed(seed)
    if checkpoint_dir is not None:
        # Process-wide and cannot be undone: exact resume needs bit-equal ops.
        tf.config.experimental.enable_op_determinism()
    done = 0
    if checkpoint_dir is not None:
        done = _steps_done(checkpoint_dir, steps, per_step=checkpoint_every != "epoch")
        if done >= epochs * steps:
            warnings.warn(
                f"the checkpoint in {checkpoint_dir!r} records {done} steps, all of the "
                f"{epochs * steps} requested, so no training is run. Delete the folder to "
                "train again from the current weights.", stacklevel=2)

    teacher_was_trainable = teacher.trainable if teacher is not None else None
    with precision_lib.policy_scope(precision), (
            strategy.scope() if strategy is not None else contextlib.nullcontext()):
        work_model = model
        if strategy is not None or precision_lib.needs_rebuild(model, precision):
            work_model = precision_lib.rebuild(model, precision)
        trained = recompute_model(work_model) if recompute else work_model
        trainer = trained
        if teacher is not None:
            teacher.trainable = False
            frozen = precision_lib.rebuild(teacher, precision) if strategy is not None else teacher
            frozen.trainable = False
            trainer = Distiller(trained, frozen, distill_alpha, temperature, hidden_mse_weight)

        optimizer = _make_optimizer(learning_rate, weight_decay, warmup_fraction,
                                    epochs * steps, precision)
        trainer.compile(
            optimizer=optimizer,
            loss=None if teacher is not None else
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])

    all_callbacks = [DivergenceGuard(steps, learning_rate, precision)]
    if checkpoint_dir is not None:
        all_callbacks.append(keras.callbacks.BackupAndRestore(
            checkpoint_dir, save_freq=checkpoint_every, delete_checkpoint=True))
    if tensorboard_dir is not None:
        all_callbacks.append(keras.callbacks.TensorBoard(tensorboard_dir))
    all_callbacks += _pruning_callbacks(work_model)
    all_callbacks += list(callbacks)

    # One pass over the repeated data, so epoch e reads the e-th reshuffle of train_ds.
    stream = train_ds.repeat(epochs).skip(done)
    try:
        with precision_lib.policy_scope(precision):
            history = trainer.fit(stream, validation_data=val_ds, epochs=epochs,
                                  steps_per_epoch=steps, callbacks=all_callbacks,
                                  verbose=verbose)
    finally:
        if teacher is not None:
            teacher.trainable = teacher_was_trainable

    if work_model is not model:
        model.set_weights(work_model.get_weights())
    history.model = model
    return history
