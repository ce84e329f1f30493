"""Block-wise training of a student encoder against a teacher encoder's block outputs.

Each student block ``i`` is trained alone on the teacher's input to block ``i`` (the
embedding output for block 0, else the teacher's block ``i-1`` output), with the MSE
to the teacher's block ``i`` output as the loss. Only one block's weights, gradients,
optimizer slots and activations live at a time, so peak training memory is that of one
block plus the cached teacher states. Whatever layers a block holds (low-rank, pruned,
quantized) are trained, because the block sub-model reuses the student's layer objects.
An optional end-to-end pass then fits the whole student's ``sequence_output``.
"""

import dataclasses
import logging

import numpy as np

from tfcompress._keras import check_model, keras, tf
from tfcompress.train.blocks import extract_blocks

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class BlockwiseResult:
    """Per-block MSE to the teacher before and after training.

    Attributes:
      losses_before: MSE of each student block on the calibration set before training.
      losses_after: the same after training.
      end_to_end_before: MSE of ``sequence_output`` before the end-to-end pass, or None.
      end_to_end_after: the same after it, or None.
    """

    losses_before: list
    losses_after: list
    end_to_end_before: float = None
    end_to_end_after: float = None


def _as_arrays(calibration_inputs):
    if isinstance(calibration_inputs, tf.data.Dataset):
        batches = list(calibration_inputs.as_numpy_iterator())
        if not batches or not isinstance(batches[0], dict):
            raise ValueError("calibration_inputs must yield dicts of encoder inputs.")
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    if isinstance(calibration_inputs, dict):
        return {k: np.asarray(v) for k, v in calibration_inputs.items()}
    raise TypeError(
        "calibration_inputs must be a dict of encoder input arrays or a tf.data.Dataset of "
        f"such dicts; received {type(calibration_inputs).__name__}.")


def train_blockwise(student_encoder, teacher_encoder, calibration_inputs, epochs=1,
                    learning_rate=1e-3, batch_size=16, end_to_end_epochs=0,
                    end_to_end_learning_rate=None, verbose=0):
    """Train each transformer block of ``student_encoder`` to match the teacher's block.

    Args:
      student_encoder: a flat tfcompress encoder; trained in place.
      teacher_encoder: a flat tfcompress encoder with as many blocks and the same
        hidden width; never trained.
      calibration_inputs: dict of encoder input arrays [examples, seq], or a
        ``tf.data.Dataset`` of such dicts.
      epochs: passes over the calibration set per block.
      learning_rate: Adam learning rate of each block and of the end-to-end pass.
      batch_size: examples per step.
      end_to_end_epochs: passes of the whole student against the teacher's
        ``sequence_output`` after the block-wise stage; 0 skips it.
      end_to_end_learning_rate: Adam learning rate of that pass; ``learning_rate / 10``
        by default, because the blocks start close to the teacher and the embeddings
        train too.
      verbose: Keras progress output.

    Returns:
      A ``BlockwiseResult`` with the per-block MSE before and after.
    """
    check_model(student_encoder, "student_encoder")
    check_model(teacher_encoder, "teacher_encoder")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer; received {epochs!r}.")
    if not isinstance(end_to_end_epochs, int) or end_to_end_epochs < 0:
        raise ValueError(
            f"end_to_end_epochs must be a non-negative integer; received {end_to_end_epochs!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; received {batch_size!r}.")
    student_blocks = extract_blocks(student_encoder)
    teacher_blocks = extract_blocks(teacher_encoder)
    if len(student_blocks) != len(teacher_blocks):
        raise ValueError(
            f"the student has {len(student_blocks)} transformer blocks and the teacher "
            f"{len(teacher_blocks)}; block-wise training pairs them one to one. Use "
            "fine_tune(..., teacher=..., hidden_mse_weight=...) for differing depths.")
    for s, t in zip(student_blocks, teacher_blocks):
        if s.output.shape[-1] != t.output.shape[-1]:
            raise ValueError(
                f"block {s.index} outputs width {s.output.shape[-1]} in the student and "
                f"{t.output.shape[-1]} in the teacher; block-wise training needs equal widths.")
    inputs = _as_arrays(calibration_inputs)

    # The teacher's input to every block and its block outputs, computed once.
    teacher_states = keras.Model(
        teacher_encoder.input,
        [teacher_blocks[0].hidden] + [b.output for b in teacher_blocks],
        name="teacher_block_states")
    states = teacher_states.predict(inputs, batch_size=batch_size, verbose=0)
    mask = inputs["input_mask"]

    before, after = [], []
    for i, block in enumerate(student_blocks):
        sub = block.model
        sub.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
        x, y = [states[i], mask], states[i + 1]
        before.append(float(sub.evaluate(x, y, batch_size=batch_size, verbose=0)))
        sub.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=False, verbose=verbose)
        after.append(float(sub.evaluate(x, y, batch_size=batch_size, verbose=0)))
        logger.info("Block %d: MSE to the teacher %.6g -> %.6g.", block.index, before[-1],
                    after[-1])
    result = BlockwiseResult(before, after)

    if end_to_end_epochs:
        whole = keras.Model(student_encoder.input,
                            student_encoder.output["sequence_output"], name="student_sequence")
        rate = end_to_end_learning_rate or learning_rate / 10
        whole.compile(optimizer=keras.optimizers.Adam(rate), loss="mse")
        target = states[-1]
        result.end_to_end_before = float(whole.evaluate(inputs, target, batch_size=batch_size,
                                                        verbose=0))
        whole.fit(inputs, target, epochs=end_to_end_epochs, batch_size=batch_size,
                  shuffle=False, verbose=verbose)
        result.end_to_end_after = float(whole.evaluate(inputs, target, batch_size=batch_size,
                                                       verbose=0))
    return result
