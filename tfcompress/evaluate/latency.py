"""Per-example latency of a Keras model or a .tflite file at batch 1."""

import dataclasses
import os
import time

import numpy as np

from tfcompress._keras import keras, tf
from tfcompress.export import signature


@dataclasses.dataclass(frozen=True)
class Latency:
    """Wall-clock time of one batch-1 call, in milliseconds.

    Attributes:
      median_ms: median over the timed runs.
      p90_ms: 90th percentile over the timed runs.
      runs: number of timed runs.
      warmup: untimed runs made first (graph tracing, allocation, caches).
      num_threads: interpreter threads for a .tflite model, None for the default.
    """

    median_ms: float
    p90_ms: float
    runs: int
    warmup: int
    num_threads: int


def _first_example(example, specs):
    return next(signature.iterate_examples(example, specs, "example"))


def latency(model_or_path, example, runs=50, warmup=5, num_threads=None):
    """Measure the latency of one example at batch 1.

    Args:
      model_or_path: a tf_keras model (called through a traced ``tf.function``) or the
        path of a .tflite file (run with the LiteRT interpreter).
      example: inputs in any form ``to_tflite`` takes; only the first example is used,
        padded or truncated to a .tflite model's sequence length.
      runs: timed runs, at least 1.
      warmup: untimed runs before timing.
      num_threads: interpreter threads for a .tflite file.

    Returns:
      A ``Latency``.
    """
    if not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs must be a positive integer; received runs={runs!r}.")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer; received warmup={warmup!r}.")

    if isinstance(model_or_path, keras.Model):
        model = model_or_path
        seq_length = signature.sequence_length_of(example, model)
        specs = signature.input_specs(model, seq_length)
        inputs = _first_example(example, specs)
        function = tf.function(lambda values: signature.call_model(model, values))
        step = lambda: tf.nest.map_structure(np.asarray, function(inputs))  # noqa: E731
    else:
        from ai_edge_litert.interpreter import Interpreter

        from tfcompress.evaluate.metrics import tflite_input_specs

        path = os.fspath(model_or_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TFLite model not found: {path!r}.")
        interpreter = Interpreter(model_path=path, num_threads=num_threads)
        inputs = _first_example(example, tflite_input_specs(interpreter))
        runner = interpreter.get_signature_runner()
        step = lambda: runner(**inputs)  # noqa: E731

    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000.0)
    return Latency(median_ms=float(np.median(times)), p90_ms=float(np.percentile(times, 90)),
                   runs=runs, warmup=warmup, num_threads=num_threads)
