"""Item: size on disk and accuracy of the main job's classifier under each tool.

Every row starts from the same fine-tuned float32 baseline and is scored on the same
test split. Rows that a tool rejects record the exception as their result instead of
numbers. The tfcompress rows run ``bench/recipes/*.yaml`` through compress, a short
recovery fine-tune with the baseline as teacher, strip and ``to_tflite``.
"""

import json
import logging
import os
import subprocess
import sys
import time

import numpy as np

from bench import common
from bench.common import NotRun
from tfcompress._keras import keras, tf

logger = logging.getLogger(__name__)

TITLE = "Size and accuracy on the embedded tweet task"
TARGET_RATIO = 12.0
TARGET_POINTS = 1.0
COLUMNS = [
    ["variant", "variant"], ["tool", "tool"], ["bytes", "bytes"], ["gzip_bytes", "gzip bytes"],
    ["smaller", "x smaller than f32 SavedModel"], ["accuracy", "accuracy"],
    ["macro_f1", "macro F1"], ["points_lost", "points lost"],
    ["sparsity", "stored zeros"], ["target", "meets target"],
    ["result", "result"],
]
RECIPES = ("qat_int8", "lowrank_int8", "prune_int8")
SIZES = {
    # Recovery fine-tuning steps (batch 32) for every row that trains after compression.
    "recovery_steps": {"full": 60, "smoke": 2},
    "calibration_examples": {"full": 256, "smoke": 16},
    "representative_examples": {"full": 100, "smoke": 8},
    "verify_examples": {"full": 64, "smoke": 8},
    "test_examples": {"full": None, "smoke": 32},
}


def _size(settings, key):
    return settings.pick(SIZES[key]["full"], SIZES[key]["smoke"])


class _Rows:
    """Collects result rows; a failing row records its error and the item goes on."""

    def __init__(self, baseline_bytes=None, baseline_accuracy=None):
        self.rows = []
        self.baseline_bytes = baseline_bytes
        self.baseline_accuracy = baseline_accuracy

    def add(self, variant, tool, path=None, evaluation=None, result="ok", **extra):
        row = {"variant": variant, "tool": tool, "result": result}
        if path is not None:
            row.update(common.size_row(path))
        if evaluation is not None:
            row["accuracy"] = float(evaluation.accuracy)
            row["macro_f1"] = float(evaluation.macro_f1)
        row.update(extra)
        if self.baseline_bytes and row.get("bytes"):
            row["smaller"] = self.baseline_bytes / row["bytes"]
        if self.baseline_accuracy is not None and row.get("accuracy") is not None:
            row["points_lost"] = 100.0 * (self.baseline_accuracy - row["accuracy"])
        if row.get("smaller") is not None and row.get("points_lost") is not None:
            row["target"] = bool(row["smaller"] >= TARGET_RATIO
                                 and row["points_lost"] <= TARGET_POINTS)
        logger.info("size/accuracy row %s (%s): %s", variant, tool,
                    {k: v for k, v in row.items() if k not in ("variant", "tool")})
        self.rows.append(row)
        return row

    def failed(self, variant, tool, error, verb="failed"):
        logger.warning("size/accuracy row %s (%s) %s: %s", variant, tool, verb,
                       common.short_error(error))
        return self.add(variant, tool, result=f"{verb}: {common.short_error(error)}")


def run(settings):
    from tfcompress.evaluate import evaluate_keras

    job = common.job_for(settings)
    folder = settings.folder("size_accuracy")
    test_limit = _size(settings, "test_examples")
    test = (job.inputs("test", test_limit), job.labels("test", test_limit))
    baseline = job.load_baseline()

    baseline_eval = evaluate_keras(baseline, test)
    rows = _Rows(common.size_row(job.baseline_savedmodel)["bytes"], baseline_eval.accuracy)
    rows.add("float32 SavedModel", "Keras", job.baseline_savedmodel, baseline_eval)

    _plain_tflite_rows(settings, job, baseline, test, folder, rows)
    _tfmot_rows(settings, job, baseline, test, folder, rows)
    _keras3_row(settings, job, baseline, test, folder, rows)
    for name in RECIPES:
        _recipe_row(settings, job, baseline, test, folder, rows, name)
    _main_job_rows(job, rows)

    return {
        "title": TITLE,
        "setup": (f"Baseline: `{job.baseline_keras}`, sequence length {job.seq_length}, "
                  f"{len(test[1])} test examples. Recovery fine-tunes: "
                  f"{_size(settings, 'recovery_steps')} steps of batch 32."),
        "targets": [f">= {TARGET_RATIO:g}x smaller than the float32 SavedModel",
                    f"<= {TARGET_POINTS:g} accuracy point lost"],
        "columns": COLUMNS,
        "rows": rows.rows,
        "notes": [
            "Sizes are bytes on disk; a folder's gzip size is that of a tar of its files "
            "at gzip level 6 (tfcompress.export.measure_path).",
            "Accuracy and macro F1 come from one model each on the same test split, so "
            "they are exact for that model; they carry no run-to-run spread.",
            "Plain TFLite rows use tf.lite.TFLiteConverter on a batch-1 concrete function "
            "with only the options its guide documents.",
        ],
    }


# --------------------------------------------------------------------------- TFLite only


def _evaluate_content(content, path, test):
    from tfcompress.evaluate import evaluate_tflite

    common.write_bytes(path, content)
    return evaluate_tflite(path, test)


def _plain_tflite_rows(settings, job, baseline, test, folder, rows):
    representative = job.inputs("train", _size(settings, "representative_examples"))
    labels = {"float32": "float32 TFLite", "dynamic": "TFLite dynamic range",
              "float16": "TFLite float16", "int8": "TFLite full int8"}
    for mode, variant in labels.items():
        try:
            content = common.plain_tflite(baseline, job.seq_length, mode, representative)
        except Exception as error:  # noqa: BLE001  (the converter's rejection is the result)
            rows.failed(variant, "TFLiteConverter", error, verb="refused")
            continue
        path = os.path.join(folder, f"plain_{mode}.tflite")
        rows.add(variant, "TFLiteConverter", path, _evaluate_content(content, path, test))


# --------------------------------------------------------------------------- tfmot


def _fit_briefly(model, settings, job, callbacks=()):
    steps = _size(settings, "recovery_steps")
    model.compile(optimizer=keras.optimizers.Adam(5e-5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data = job.dataset("train", 32, shuffle=True).repeat()
    model.fit(data, epochs=1, steps_per_epoch=steps, callbacks=list(callbacks), verbose=0)
    return model


def _tfmot_rows(settings, job, baseline, test, folder, rows):
    import tensorflow_model_optimization as tfmot

    sparsity = tfmot.sparsity.keras
    steps = _size(settings, "recovery_steps")
    # The tutorial's schedule, 50% -> 80% over the training run. The wrapper counts steps
    # from 1 and prunes when the step is a multiple of the frequency (default 100), so a
    # frequency of a quarter of the run makes it prune four times, the last at end_step.
    schedule = sparsity.PolynomialDecay(initial_sparsity=0.5, final_sparsity=0.8,
                                        begin_step=0, end_step=steps,
                                        frequency=max(1, steps // 4))
    representative = job.inputs("train", _size(settings, "representative_examples"))

    # The tutorial's first call: the whole model at once.
    try:
        whole = sparsity.prune_low_magnitude(job.load_baseline(), pruning_schedule=schedule)
    except Exception as error:  # noqa: BLE001  (tfmot's rejection is the result)
        rows.failed("prune_low_magnitude(whole model)", "tfmot", error, verb="refused")
    else:
        rows.add("prune_low_magnitude(whole model)", "tfmot",
                 result=f"accepted ({len(whole.layers)} layers); trained in the per-layer rows")

    # The tutorial's fallback: clone_model, wrapping only the Dense layers.
    # Returning the other layers themselves, as the tutorial does, keeps their weights; the
    # wrapped Dense layers keep theirs too.
    def prune_dense(layer):
        if isinstance(layer, keras.layers.Dense):
            return sparsity.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer

    try:
        pruned = keras.models.clone_model(job.load_baseline(), clone_function=prune_dense)
        _fit_briefly(pruned, settings, job, [sparsity.UpdatePruningStep()])
        stripped = sparsity.strip_pruning(pruned)
    except Exception as error:  # noqa: BLE001
        rows.failed("prune_low_magnitude per Dense layer", "tfmot", error)
    else:
        for mode in ("dynamic", "int8"):
            variant = f"pruned Dense + TFLite {mode}"
            try:
                content = common.plain_tflite(stripped, job.seq_length, mode, representative)
            except Exception as error:  # noqa: BLE001
                rows.failed(variant, "tfmot + TFLiteConverter", error, verb="refused")
                continue
            path = os.path.join(folder, f"tfmot_pruned_{mode}.tflite")
            rows.add(variant, "tfmot + TFLiteConverter", path,
                     _evaluate_content(content, path, test),
                     sparsity=_kernel_sparsity(stripped))

    try:
        quantized = tfmot.quantization.keras.quantize_model(job.load_baseline())
    except Exception as error:  # noqa: BLE001
        rows.failed("quantize_model(whole model)", "tfmot", error, verb="refused")
    else:
        try:
            _fit_briefly(quantized, settings, job)
            content = common.plain_tflite(quantized, job.seq_length, "dynamic")
            path = os.path.join(folder, "tfmot_qat.tflite")
            rows.add("quantize_model + TFLite", "tfmot", path,
                     _evaluate_content(content, path, test))
        except Exception as error:  # noqa: BLE001
            rows.failed("quantize_model + TFLite", "tfmot", error)


def _kernel_sparsity(model):
    total = zeros = 0
    for weight in model.weights:
        if len(weight.shape) == 2 and "kernel" in weight.name:
            values = np.asarray(weight)
            total += values.size
            zeros += int(np.sum(values == 0))
    return zeros / total if total else 0.0


# --------------------------------------------------------------------------- Keras 3


def _keras3_row(settings, job, baseline, test, folder, rows):
    from tfcompress.bert import encoder_config
    from tfcompress.evaluate import macro_f1

    variant, tool = 'model.quantize("int8")', "Keras 3"
    try:
        encoder = encoder_config(baseline)
    except ValueError as error:
        rows.failed(variant, tool, error, verb="not run")
        return
    names = {layer.name for layer in baseline.layers}
    config = {
        "vocab_size": encoder.vocab_size, "hidden_size": encoder.hidden_size,
        "num_layers": encoder.num_layers, "num_heads": encoder.num_heads,
        "head_size": encoder.attention_head_size, "intermediate_size": encoder.intermediate_size,
        "max_position_embeddings": encoder.max_position_embeddings,
        "type_vocab_size": encoder.type_vocab_size, "hidden_act": encoder.hidden_act,
        "layer_norm_eps": encoder.layer_norm_eps,
        "pooling": "mean" if "classifier/mean_pooling" in names else "pooled",
        "num_classes": int(baseline.output.shape[-1]),
    }
    arrays = {}
    for layer in baseline.layers:
        for i, value in enumerate(layer.get_weights()):
            arrays[f"{layer.name}::{i}"] = value
    check = {k: v[:8] for k, v in test[0].items()}
    arrays["check::logits"] = np.asarray(baseline(check, training=False))
    for name, values in check.items():
        arrays[f"check::{name}"] = values
    for name, values in test[0].items():
        arrays[f"test::{name}"] = values
    weights_path = os.path.join(folder, "keras3_weights.npz")
    config_path = os.path.join(folder, "keras3_config.json")
    np.savez(weights_path, **arrays)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f)

    environment = dict(os.environ)
    environment.pop("TF_USE_LEGACY_KERAS", None)
    command = [sys.executable, "-m", "bench.keras3_int8", weights_path, config_path, folder]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    completed = subprocess.run(command, env=environment, cwd=root, capture_output=True,
                               text=True, timeout=1800, check=False)
    os.remove(weights_path)
    if completed.returncode != 0:
        last = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        rows.add(variant, tool, result=f"failed: exit code {completed.returncode}: {last}"[:300])
        return
    measured = json.loads(completed.stdout.strip().splitlines()[-1])
    logits = np.load(measured["test_logits"])
    predictions = logits.argmax(axis=1)
    labels = np.asarray(test[1])
    rows.add(variant, f"Keras {measured['keras']}", bytes=measured["bytes"],
             gzip_bytes=measured["gzip_bytes"],
             accuracy=float(np.mean(predictions == labels)),
             macro_f1=macro_f1(labels, predictions, logits.shape[1]),
             result=(f"ok; its float32 copy matched the baseline's logits to "
                     f"{measured['float_max_abs_diff']:.1e}"))


# --------------------------------------------------------------------------- tfcompress


def _recipe_row(settings, job, baseline, test, folder, rows, name):
    from tfcompress.compress import compress, strip
    from tfcompress.evaluate import evaluate_tflite
    from tfcompress.export import to_tflite
    from tfcompress.train import fine_tune

    variant, tool = f"recipe {name} + TFLite int8", "tfcompress"
    try:
        recipe = common.load_recipe(name, settings.smoke)
        start = time.perf_counter()
        calibration = job.inputs("train", _size(settings, "calibration_examples"))
        small, _ = compress(baseline, recipe, calibration_data=calibration)
        steps = _size(settings, "recovery_steps")
        fine_tune(small, job.dataset("train", 32, shuffle=True).repeat(), epochs=1,
                  steps_per_epoch=steps, learning_rate=5e-5, teacher=baseline, verbose=0)
        inference = strip(small)
        path = os.path.join(folder, f"tfcompress_{name}.tflite")
        result = to_tflite(inference, path, mode="int8",
                           representative_data=job.inputs(
                               "train", _size(settings, "representative_examples")),
                           verify_data=job.inputs("validation",
                                                  _size(settings, "verify_examples")),
                           seq_length=job.seq_length, overwrite=True)
        seconds = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001  (recorded as the row's result)
        rows.failed(variant, tool, error)
        return
    rows.add(variant, tool, result.path, evaluate_tflite(result.path, test),
             sparsity=float(result.sparsity),
             result=f"ok; compress + recovery + export took {seconds:.0f} s")


def _main_job_rows(job, rows):
    if job.report_json is None:
        rows.add("main-job recipe", "tfcompress",
                 result=f"not run: {job.folder}/report.json is missing")
        return
    try:
        variants = common.read_main_job_report(job.report_json)
    except (ValueError, OSError) as error:
        rows.failed("main-job recipe", "tfcompress", error, verb="not run")
        return
    for variant in variants:
        if variant.get("kind") != "tflite" and "compress" not in str(variant.get("name")):
            continue
        rows.add(f"main job: {variant.get('name')}", "tfcompress (report.json)",
                 bytes=variant.get("bytes"), gzip_bytes=variant.get("gzip_bytes"),
                 accuracy=variant.get("accuracy"), macro_f1=variant.get("macro_f1"),
                 result="ok; read from report.json")
