"""Item: batch-1 inference latency against the float32 Keras model of the same run.

The classifier is the main job's baseline when a job folder is there, else the
embedded MiniLM with a fresh classification head (latency does not depend on the
trained values). The reference is the float32 Keras model called through a
``tf.function``. The other variants are plain ``TFLiteConverter`` float32,
dynamic-range and full-int8 files, and tfcompress recipes that are compressed (without
recovery training), stripped and exported with ``to_tflite``. The main job's own .tflite
files are added when its report lists them. TFLite files run in the LiteRT interpreter
with as many threads as the machine has cores.
"""

import logging
import os

import numpy as np

from bench import common, stats
from bench.common import NotRun

logger = logging.getLogger(__name__)

TITLE = "Inference latency at batch 1"
TARGET_INT8 = 3.0
TARGET_RECIPE = 5.0
COLUMNS = [["variant", "variant"], ["median_ms", "ms, median [min, max]"],
           ["p90_ms", "p90 ms"], ["speedup", "x faster than Keras float32"],
           ["target", "target"], ["result", "result"]]
RECIPES = ("qat_int8", "lowrank_int8", "prune_int8")
SIZES = {"runs": {"full": 50, "smoke": 5}, "warmup": {"full": 10, "smoke": 1},
         "calibration_examples": {"full": 128, "smoke": 8}}


def _classifier(settings):
    try:
        job = common.job_for(settings)
        return job.load_baseline(), job.inputs("train", 256), job
    except NotRun as reason:
        if settings.smoke:
            raise
        logger.info("latency: %s; timing the embedded MiniLM with a new head instead", reason)
    from tfcompress import bert
    from tfcompress.text import BertPreprocessor, encode_numpy
    from tfcompress.data import load_tweets

    model = bert.classifier(bert.load_minilm(), num_classes=3, pooling="mean")
    preprocessor = BertPreprocessor(bert.minilm_vocab(), seq_length=48)
    texts = load_tweets(limit_per_split=256).train.texts
    return model, encode_numpy(preprocessor, texts), None


def _tflite_runner(path, example, threads):
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=path, num_threads=threads).get_signature_runner()
    return lambda: runner(**example)


def run(settings):
    from tfcompress.compress import compress, strip
    from tfcompress.export import Tolerance, to_tflite
    from tfcompress._keras import tf

    runs = settings.pick(SIZES["runs"]["full"], SIZES["runs"]["smoke"])
    warmup = settings.pick(SIZES["warmup"]["full"], SIZES["warmup"]["smoke"])
    threads = len(os.sched_getaffinity(0))
    folder = settings.folder("latency")
    model, inputs, job = _classifier(settings)
    seq_length = int(inputs["input_word_ids"].shape[1])
    example = {k: v[:1].astype(np.int32) for k, v in inputs.items()}
    calibration_size = settings.pick(SIZES["calibration_examples"]["full"],
                                     SIZES["calibration_examples"]["smoke"])
    calibration = {k: v[:calibration_size] for k, v in inputs.items()}

    rows = []
    function = tf.function(lambda values: model(values, training=False))
    keras_ms = stats.time_calls(lambda: function(example).numpy(), runs, warmup)
    rows.append({"variant": "Keras float32 (tf.function)", "median_ms": keras_ms,
                 "p90_ms": keras_ms["p90"], "speedup": 1.0, "result": "ok"})

    def add(variant, path, target=None):
        measured = stats.time_calls(_tflite_runner(path, example, threads), runs, warmup)
        speedup = stats.ratio(keras_ms, measured)
        row = {"variant": variant, "median_ms": measured, "p90_ms": measured["p90"],
               "speedup": speedup, "result": "ok"}
        if target is not None:
            row["target"] = f">= {target:g}x: {'met' if speedup >= target else 'missed'}"
        logger.info("latency: %s %.3f ms median (%.2fx)", variant, measured["median"], speedup)
        rows.append(row)

    for mode in ("float32", "dynamic", "int8"):
        variant = f"TFLite {mode} (plain converter)"
        try:
            content = common.plain_tflite(model, seq_length, mode, calibration)
        except Exception as error:  # noqa: BLE001  (the converter's rejection is the result)
            rows.append({"variant": variant, "result": f"refused: {common.short_error(error)}"})
            continue
        path = common.write_bytes(os.path.join(folder, f"plain_{mode}.tflite"), content)
        add(variant, path, TARGET_INT8 if mode == "int8" else None)

    for name in RECIPES:
        variant = f"tfcompress {name} (TFLite int8)"
        try:
            small, _ = compress(model, common.load_recipe(name, settings.smoke),
                                calibration_data=calibration)
            # No tolerance: without recovery training the outputs drift from the float
            # model, and accuracy is judged in the size and accuracy item, not here.
            result = to_tflite(strip(small), os.path.join(folder, f"{name}.tflite"),
                               mode="int8", representative_data=calibration,
                               verify_data={k: v[:8] for k, v in calibration.items()},
                               seq_length=seq_length, overwrite=True, tolerance=Tolerance())
        except Exception as error:  # noqa: BLE001  (recorded as the row's result)
            rows.append({"variant": variant, "result": f"failed: {common.short_error(error)}"})
            continue
        add(variant, result.path, TARGET_RECIPE)
        rows[-1]["result"] = (f"ok; output cosine to the Keras model "
                              f"{result.verification.cosine:.3f} (not checked)")

    for variant, path in _main_job_files(job):
        add(f"main job: {variant}", path, TARGET_RECIPE if "compress" in variant else None)

    return {
        "title": TITLE,
        "setup": (f"Batch 1, sequence length {seq_length}, {runs} timed calls after "
                  f"{warmup} warm-up calls; TFLite with {threads} interpreter threads. "
                  f"Model: {'the main-job baseline' if job else 'MiniLM with a new head'}."),
        "targets": [f">= {TARGET_INT8:g}x for int8 TFLite",
                    f">= {TARGET_RECIPE:g}x for the compressed recipe"],
        "columns": COLUMNS,
        "rows": rows,
        "notes": ["The recipes here are not fine-tuned after compression; their accuracy "
                  "is in the size and accuracy item, their speed does not depend on it."],
    }


def _main_job_files(job):
    if job is None or job.report_json is None:
        return []
    files = []
    for variant in common.read_main_job_report(job.report_json):
        path = variant.get("path")
        if variant.get("kind") == "tflite" and path:
            # report.json paths are as the job was given its output folder: absolute, or
            # relative to the directory it ran in, or to the folder itself.
            if not os.path.isfile(path):
                path = os.path.join(job.folder, path)
            if os.path.isfile(path):
                files.append((variant.get("name", os.path.basename(path)), path))
    return files
