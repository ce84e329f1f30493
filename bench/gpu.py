"""Latency and training memory on an NVIDIA GPU with mixed_float16, printed as JSON.

Run ``python -m bench.gpu`` on a machine with a GPU; it takes a few minutes (sized for
under 8 minutes on one data-center GPU, not yet run on one). It measures:

- batch-1 latency at sequence length 48 of the MiniLM classifier called through a
  ``tf.function``, float32 against the mixed_float16 rebuild of the same model, and
  batch-32 throughput of both;
- one fine-tuning step at sequence lengths 128 and 512 for the configurations of
  ``bench.train_memory`` (mixed means mixed_float16 with loss scaling there), each in a
  fresh process, with the TensorFlow allocator's peak as the memory figure.

The JSON has the keys ``machine``, ``latency`` and ``train_memory``; ``--out FILE`` also
writes it to a file.
"""

import argparse
import json
import logging
import os
import subprocess
import sys

import numpy as np

logger = logging.getLogger("bench.gpu")

SEQ_LENGTH = 48
TRAIN_SEQS = (128, 512)
TRAIN_BATCH = 32
TRAIN_STEPS = 5


def _inputs(batch, seq, seed=0):
    rng = np.random.default_rng(seed)
    return {"input_word_ids": rng.integers(1, 30522, (batch, seq)).astype(np.int32),
            "input_mask": np.ones((batch, seq), np.int32),
            "input_type_ids": np.zeros((batch, seq), np.int32)}


def measure_latency(runs=200, warmup=20):
    """Return batch-1 and batch-32 call times of the float32 and mixed_float16 models."""
    from bench import stats
    from tfcompress import bert, train
    from tfcompress._keras import tf

    model = bert.classifier(bert.load_minilm(), num_classes=3, pooling="mean")
    variants = {"float32": model, "mixed_float16": train.rebuild(model, "mixed_float16")}
    results = {}
    for name, variant in variants.items():
        function = tf.function(lambda values, m=variant: m(values, training=False))
        for batch in (1, 32):
            example = {k: tf.constant(v) for k, v in _inputs(batch, SEQ_LENGTH).items()}
            results[f"{name}_batch{batch}_ms"] = stats.time_calls(
                lambda: function(example).numpy(), runs, warmup)
    results["mixed_float16_speedup_batch1"] = stats.ratio(
        results["float32_batch1_ms"], results["mixed_float16_batch1_ms"])
    results["mixed_float16_speedup_batch32"] = stats.ratio(
        results["float32_batch32_ms"], results["mixed_float16_batch32_ms"])
    return results


def measure_training():
    """Run every ``bench.train_memory`` configuration in a fresh process on GPU:0."""
    from bench.train_memory import CONFIGS

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for seq in TRAIN_SEQS:
        for config in CONFIGS:
            command = [sys.executable, "-m", "bench.train_memory", config, str(seq),
                       str(TRAIN_BATCH), str(TRAIN_STEPS), "--device", "GPU:0"]
            completed = subprocess.run(command, cwd=root, capture_output=True, text=True,
                                       timeout=300, check=False)
            if completed.returncode != 0:
                last = (completed.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append({"config": config, "seq": seq,
                             "result": f"failed: exit code {completed.returncode}: {last}"})
            else:
                rows.append(json.loads(completed.stdout.strip().splitlines()[-1]))
            logger.info("gpu training: %s seq %d done", config, seq)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from bench import machine
    from tfcompress._keras import tf

    if not tf.config.list_physical_devices("GPU"):
        raise SystemExit("bench.gpu needs a GPU that TensorFlow can see; none was found. "
                         "Use `python -m bench.run` on a CPU machine.")
    results = {"machine": machine.describe(), "latency": measure_latency(),
               "train_memory": measure_training()}
    text = json.dumps(results, indent=1)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
