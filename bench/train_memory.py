"""Item: peak memory and step time of one fine-tuning step, per training configuration.

Each configuration runs in a fresh process (``python -m bench.train_memory CONFIG SEQ
BATCH STEPS [--smoke] [--device DEVICE]``), which prints one JSON line:

- ``training_peak_bytes``: the process's peak resident set (VmHWM) at the end minus its
  resident set after the model was built. It covers everything training adds: gradients,
  optimizer slots, activations, and graph tracing, which costs about the same in every
  configuration. On a GPU it is TensorFlow's allocator peak instead.
- ``step_peak_bytes``: ``tfcompress.memory.measure`` around the timed steps, after a
  warm-up step created the optimizer slots: the transient memory of a step.
- ``step_ms``: the timed steps as median [min, max].

Configurations:

- ``float32``.
- ``mixed``: mixed_bfloat16 on CPU, mixed_float16 with loss scaling on a GPU.
- ``mixed_recompute``: mixed, and every transformer block recomputes its activations in
  the backward pass.
- ``blockwise``: ``train_blockwise`` trains each block alone against the frozen
  teacher's block outputs, one step per block.
"""

import json
import logging
import os
import subprocess
import sys
import time

import numpy as np

logger = logging.getLogger(__name__)

TITLE = "Training memory and speed of one fine-tuning step"
CONFIGS = ("float32", "mixed", "mixed_recompute", "blockwise")
TARGET = 0.5
COLUMNS = [["config", "configuration"], ["seq", "seq"], ["batch", "batch"],
           ["training_peak_mib", "training peak MiB"], ["peak_ratio", "x float32 peak"],
           ["step_peak_mib", "step transient MiB"], ["step_ms", "step ms"],
           ["time_ratio", "x float32 time"], ["estimate_mib", "tfcompress estimate MiB"],
           ["result", "result"]]
SIZES = {"seq": {"full": (128, 512), "smoke": (16, 32)}, "batch": {"full": 8, "smoke": 2},
         "steps": {"full": {128: 3, 512: 2}, "smoke": {16: 2, 32: 2}}}


def _rss_bytes():
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS is missing from /proc/self/status.")


def _hwm_bytes():
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM is missing from /proc/self/status.")


def _encoder(smoke):
    from tfcompress import bert

    if smoke:
        return bert.build_encoder(bert.BertConfig(
            vocab_size=1000, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
            max_position_embeddings=64))
    return bert.load_minilm()


def measure_config(config, seq, batch, steps, smoke=False, device=None):
    """Measure one configuration in this process; return the JSON-ready dict."""
    from bench import stats
    from tfcompress import bert, memory, train
    from tfcompress._keras import keras, tf

    gpu = bool(tf.config.list_physical_devices("GPU")) if device is None else device != "cpu"
    precision = "mixed_float16" if gpu else "mixed_bfloat16"
    rng = np.random.default_rng(0)
    vocab = 1000 if smoke else 30522
    inputs = {"input_word_ids": rng.integers(1, vocab, (batch, seq)).astype(np.int32),
              "input_mask": np.ones((batch, seq), np.int32),
              "input_type_ids": np.zeros((batch, seq), np.int32)}
    labels = rng.integers(0, 3, (batch,)).astype(np.int32)

    encoder = _encoder(smoke)
    result = {"config": config, "seq": seq, "batch": batch, "steps": steps,
              "precision": "float32" if config in ("float32", "blockwise") else precision}
    if config == "blockwise":
        teacher = _encoder(smoke)
        start_rss = _rss_bytes()

        def step():
            return train.train_blockwise(encoder, teacher, inputs, epochs=1, batch_size=batch)
    else:
        model = bert.classifier(encoder, num_classes=3, pooling="mean")
        try:
            result["estimate_bytes"] = int(memory.estimate(
                model, batch_size=batch, seq_length=seq, precision=result["precision"],
                optimizer="adamw").total)
        except Exception as error:  # noqa: BLE001  (the estimate is an extra column)
            logger.warning("memory estimate failed: %s", error)
        if config != "float32":
            model = train.rebuild(model, precision)
        if config == "mixed_recompute":
            model = train.recompute_model(model)
        optimizer = keras.optimizers.AdamW(learning_rate=5e-5)
        if result["precision"] == "mixed_float16":
            optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
        model.compile(optimizer=optimizer,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        start_rss = _rss_bytes()

        def step():
            return model.train_on_batch(inputs, labels)

    step()  # traces the step and creates the optimizer slots
    times = []

    def timed_steps():
        for _ in range(steps):
            begin = time.perf_counter()
            step()
            times.append((time.perf_counter() - begin) * 1000.0)

    measured = memory.measure(timed_steps, device="GPU:0" if gpu else "cpu")
    result["step_peak_bytes"] = int(measured.peak_bytes)
    result["memory_method"] = measured.method
    if gpu:
        result["training_peak_bytes"] = int(
            tf.config.experimental.get_memory_info("GPU:0")["peak"])
    else:
        result["training_peak_bytes"] = int(_hwm_bytes() - start_rss)
    result["step_ms"] = stats.summarize(times)
    return result


def _child(config, seq, batch, steps, smoke, timeout):
    command = [sys.executable, "-m", "bench.train_memory", config, str(seq), str(batch),
               str(steps)] + (["--smoke"] if smoke else [])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    completed = subprocess.run(command, cwd=root, capture_output=True, text=True,
                               timeout=timeout, check=False)
    if completed.returncode != 0:
        last = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return {"config": config, "seq": seq, "batch": batch,
                "result": f"failed: exit code {completed.returncode}: {last}"[:300]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run(settings):
    seqs = settings.pick(SIZES["seq"]["full"], SIZES["seq"]["smoke"])
    batch = settings.pick(SIZES["batch"]["full"], SIZES["batch"]["smoke"])
    steps = settings.pick(SIZES["steps"]["full"], SIZES["steps"]["smoke"])
    rows = []
    for seq in seqs:
        reference = None
        for config in CONFIGS:
            row = _child(config, seq, batch, steps[seq], settings.smoke, timeout=900)
            if "training_peak_bytes" in row:
                row["result"] = "ok"
                row["training_peak_mib"] = row["training_peak_bytes"] / 2**20
                row["step_peak_mib"] = row["step_peak_bytes"] / 2**20
                if row.get("estimate_bytes"):
                    row["estimate_mib"] = row["estimate_bytes"] / 2**20
                if config == "float32":
                    reference = row
                if reference is not None:
                    row["peak_ratio"] = (row["training_peak_bytes"]
                                         / reference["training_peak_bytes"])
                    row["time_ratio"] = row["step_ms"]["median"] / reference["step_ms"]["median"]
            logger.info("train memory: %s seq %d: %s", config, seq,
                        row.get("training_peak_mib", row.get("result")))
            rows.append(row)
    ok = [r for r in rows if r.get("config") == "mixed_recompute" and "peak_ratio" in r]
    notes = [f"seq {r['seq']}: mixed + recompute peak is {r['peak_ratio']:.2f}x float32 "
             f"(target <= {TARGET:g}x: {'met' if r['peak_ratio'] <= TARGET else 'missed'})."
             for r in ok]
    notes.append("blockwise trains one block at a time on the teacher's block inputs, so "
                 "its step is one optimizer step per block, tracing of each block's "
                 "training function included; its time is not comparable to one "
                 "end-to-end step.")
    return {
        "title": TITLE,
        "setup": (f"{settings.pick('MiniLM-L6', 'Tiny 2-layer')} classifier, batch {batch}, AdamW, random token ids. CPU: "
                  "mixed means mixed_bfloat16. Each configuration in a fresh process; "
                  f"step time over {', '.join(f'{steps[s]} steps at seq {s}' for s in seqs)} "
                  "after one warm-up step. Peaks are measured (peak RSS), never estimated; "
                  "the estimate column is tfcompress.memory.estimate for comparison."),
        "targets": [f"mixed + recompute peak <= {TARGET:g}x float32"],
        "columns": COLUMNS,
        "rows": rows,
        "notes": notes,
    }


def main(argv):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.train_memory")
    parser.add_argument("config", choices=CONFIGS)
    parser.add_argument("seq", type=int)
    parser.add_argument("batch", type=int)
    parser.add_argument("steps", type=int)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--device", default=None, help='"cpu" or "GPU:0" (default: auto)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = measure_config(args.config, args.seq, args.batch, args.steps, args.smoke,
                            args.device)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
