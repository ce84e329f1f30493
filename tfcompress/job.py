"""The main job: recipe -> fine-tuned float baseline -> compressed, recovered, exported, evaluated.

Every step writes its outputs under the output folder and a marker in ``.steps/``. The
marker records a key and the size of each output file. The key is a hash of the recipe
sections the step reads and of the keys of the steps it depends on. A rerun of the same command skips a step
only when its key is unchanged and every recorded output still exists with its recorded
size; otherwise the step and every step after it runs again.
"""

import copy
import hashlib
import json
import logging
import os
import shutil
import time

import numpy as np
import yaml

logger = logging.getLogger(__name__)

STEPS = ("data", "baseline", "compress", "recovery", "strip", "export", "evaluate", "report")
_SECTIONS = ("model", "data", "train", "recovery", "compress", "export", "evaluate", "quick")


# --------------------------------------------------------------------------- recipe


def _merge(base, override):
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


DEFAULTS = {
    "model": {"source": "minilm", "path": None, "pooling": "mean", "dropout": 0.1},
    "data": {"source": "tweets", "path": None, "text_column": "text", "label_column": "label",
             "seq_length": 48, "max_train": None, "max_validation": None, "max_test": None},
    "train": {"epochs": 1, "batch_size": 32, "learning_rate": 5e-5, "precision": "float32"},
    "recovery": {"epochs": 1, "batch_size": 32, "learning_rate": 5e-5, "precision": "float32",
                 "distill_alpha": 0.5, "temperature": 2.0},
    "compress": [],
    "export": {"baseline_modes": ["float32", "dynamic", "int8"], "modes": ["int8"],
               "tolerance": {}},
    "evaluate": {"latency_runs": 50, "warmup_runs": 5, "num_threads": None},
}


def load_job_recipe(path, quick=False):
    """Read a main-job recipe file and return the resolved dict (defaults and --quick applied)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"recipe file not found: {path!r}.")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"recipe {path!r} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {path!r} must be a mapping of sections; received {type(raw).__name__}.")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"recipe {path!r} has unknown sections {unknown}; known sections: {list(_SECTIONS)}.")
    for section, value in raw.items():
        expected = list if section == "compress" else dict
        if not isinstance(value, expected):
            raise ValueError(
                f"recipe section {section!r} in {path!r} must be a "
                f"{'list of rules' if expected is list else 'mapping of keys'}; received "
                f"{value!r}.")
    resolved = _merge(DEFAULTS, {k: v for k, v in raw.items() if k != "quick"})
    resolved["compress"] = raw.get("compress", [])
    if quick:
        resolved = _merge(resolved, raw.get("quick", {}))
    resolved["quick"] = bool(quick)

    _check_values(resolved)
    modes = set(resolved["export"]["baseline_modes"]) | set(resolved["export"]["modes"])
    from tfcompress.export import MODES

    unknown_modes = sorted(modes - set(MODES))
    if unknown_modes:
        raise ValueError(f"export modes {unknown_modes} are unknown; choose from {list(MODES)}.")
    for section in ("model", "data", "train", "recovery", "export", "evaluate"):
        extra = sorted(set(resolved[section]) - set(DEFAULTS[section]))
        if extra:
            raise ValueError(
                f"recipe section {section!r} has unknown keys {extra}; known keys: "
                f"{sorted(DEFAULTS[section])}.")
    source = resolved["model"]["source"]
    if source not in ("minilm", "hub", "huggingface"):
        raise ValueError(f"model.source must be minilm, hub or huggingface; received {source!r}.")
    if source != "minilm" and not resolved["model"]["path"]:
        raise ValueError(f"model.source={source!r} needs model.path (a handle, URL or folder).")
    if resolved["data"]["source"] not in ("tweets", "csv"):
        raise ValueError(f"data.source must be tweets or csv; received {resolved['data']['source']!r}.")
    if resolved["data"]["source"] == "csv" and not resolved["data"]["path"]:
        raise ValueError("data.source=csv needs data.path, the CSV file to read.")
    if resolved["data"]["source"] == "csv" and not os.path.isfile(resolved["data"]["path"]):
        raise FileNotFoundError(f"data.path not found: {resolved['data']['path']!r}.")
    return resolved


def _check_values(resolved):
    """Check the training, data and export values of a resolved recipe before any work."""
    def positive_int(section, key, allow_none=False):
        value = resolved[section][key]
        if allow_none and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{section}.{key} must be a positive integer"
                             f"{' or null' if allow_none else ''}; received {value!r}.")

    def positive_number(section, key):
        value = resolved[section][key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{section}.{key} must be a positive number; received {value!r}.")

    for section in ("train", "recovery"):
        positive_int(section, "epochs")
        positive_int(section, "batch_size")
        positive_number(section, "learning_rate")
        precision = resolved[section]["precision"]
        if precision not in ("float32", "mixed_float16", "mixed_bfloat16"):
            raise ValueError(f"{section}.precision must be float32, mixed_float16 or "
                             f"mixed_bfloat16; received {precision!r}.")
    positive_int("data", "seq_length")
    if resolved["data"]["seq_length"] < 3:
        raise ValueError("data.seq_length must be at least 3 ([CLS], one token, [SEP]); "
                         f"received {resolved['data']['seq_length']!r}.")
    for key in ("max_train", "max_validation", "max_test"):
        positive_int("data", key, allow_none=True)
    if resolved["model"]["pooling"] not in ("mean", "pooled"):
        raise ValueError(f"model.pooling must be mean or pooled; received "
                         f"{resolved['model']['pooling']!r}.")
    for key in ("baseline_modes", "modes"):
        if not isinstance(resolved["export"][key], list):
            raise ValueError(f"export.{key} must be a list of modes such as [float32, "
                             f"dynamic]; received {resolved['export'][key]!r}.")


def _check_against_model(recipe):
    """Check the compression rules and the sequence length against the model's shape.

    The encoder is built from its config alone (random weights, no download), so a
    rule that matches no layer fails in seconds instead of after the baseline training.
    A TF-Hub source is only checked once it has been loaded.
    """
    from tfcompress import bert
    from tfcompress.compress import Recipe
    from tfcompress.compress import graph

    model = recipe["model"]
    if model["source"] == "hub":
        return
    folder = bert.minilm_folder() if model["source"] == "minilm" else model["path"]
    config = bert.BertConfig.from_huggingface(os.path.join(folder, "config.json"))
    seq_length = recipe["data"]["seq_length"]
    if seq_length > config.max_position_embeddings:
        raise ValueError(
            f"data.seq_length={seq_length} exceeds the model's "
            f"{config.max_position_embeddings} position embeddings; use at most "
            f"{config.max_position_embeddings}.")
    skeleton = bert.classifier(bert.build_encoder(config), num_classes=2,
                               pooling=recipe["model"]["pooling"])
    Recipe.from_dict({"compress": recipe["compress"]}).resolve(graph.layer_table(skeleton))


# --------------------------------------------------------------------------- step markers


class StepCache:
    """Markers of finished steps in ``<out>/.steps/<step>.json``."""

    def __init__(self, out):
        self.folder = os.path.join(out, ".steps")
        self.out = out
        os.makedirs(self.folder, exist_ok=True)

    def _marker(self, step):
        return os.path.join(self.folder, f"{step}.json")

    @staticmethod
    def _sizes(path):
        if os.path.isdir(path):
            sizes = {}
            for root, _, files in os.walk(path):
                for name in files:
                    full = os.path.join(root, name)
                    sizes[os.path.relpath(full, path)] = os.path.getsize(full)
            return sizes
        return os.path.getsize(path) if os.path.exists(path) else None

    def is_done(self, step, key):
        marker = self._marker(step)
        if not os.path.isfile(marker):
            return False
        with open(marker, encoding="utf-8") as f:
            record = json.load(f)
        if record.get("key") != key:
            return False
        for relative, sizes in record["outputs"].items():
            path = os.path.join(self.out, relative)
            if not os.path.exists(path) or self._sizes(path) != sizes:
                logger.info("step %s: output %s is missing or changed; running it again",
                            step, relative)
                return False
        return True

    def record(self, step, key, outputs, seconds):
        entry = {"key": key, "seconds": round(seconds, 1),
                 "outputs": {os.path.relpath(p, self.out): self._sizes(p) for p in outputs}}
        temporary = self._marker(step) + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(entry, f, indent=1)
        os.replace(temporary, self._marker(step))

    def invalidate_from(self, step):
        for later in STEPS[STEPS.index(step):]:
            if os.path.exists(self._marker(later)):
                os.remove(self._marker(later))


def _key(*parts):
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- data


def _load_splits(data):
    import tfcompress.data as tfc_data

    if data["source"] == "tweets":
        return tfc_data.load_tweets()
    dataset = tfc_data.from_csv(data["path"], text_column=data["text_column"],
                                label_column=data["label_column"])
    return tfc_data.split(dataset)


def step_data(recipe, out):
    """Load, subsample and tokenize the three splits; save them as npz files."""
    from tfcompress.text import BertPreprocessor, encode_numpy

    data = recipe["data"]
    splits = _load_splits(data)
    preprocessor = BertPreprocessor(_vocab_file(recipe), seq_length=data["seq_length"])
    folder = os.path.join(out, "data")
    os.makedirs(folder, exist_ok=True)
    outputs = []
    for split_name, limit_key in (("train", "max_train"), ("validation", "max_validation"),
                                  ("test", "max_test")):
        split = getattr(splits, split_name)
        if data[limit_key]:
            split = split.subsample(data[limit_key])
        labels = np.asarray(split.labels, np.int32)
        if len(labels) == 0:
            raise ValueError(
                f"the {split_name} split has no examples ({len(splits.train)} train, "
                f"{len(splits.validation)} validation, {len(splits.test)} test after "
                "cleaning); the data needs at least a few dozen labelled rows per class.")
        arrays = encode_numpy(preprocessor, split.texts)
        path = os.path.join(folder, f"{split_name}.npz")
        np.savez(path + ".tmp.npz", labels=labels, **arrays)
        os.replace(path + ".tmp.npz", path)
        outputs.append(path)
        logger.info("data: %s split, %d examples", split_name, len(labels))
    labels_path = os.path.join(folder, "labels.json")
    with open(labels_path, "w", encoding="utf-8") as f:
        json.dump(list(splits.labels), f)
    outputs.append(labels_path)
    return outputs


def _vocab_file(recipe):
    from tfcompress.bert import minilm_vocab

    model = recipe["model"]
    if model["source"] == "minilm":
        return minilm_vocab()
    if model["source"] == "huggingface":
        return os.path.join(model["path"], "vocab.txt")
    candidate = os.path.join(model["path"], "assets", "vocab.txt")
    if not os.path.isfile(candidate):
        raise FileNotFoundError(
            f"no vocab file at {candidate!r}; a TF-Hub BERT encoder folder keeps its "
            "WordPiece vocabulary in assets/vocab.txt.")
    return candidate


def load_split(out, split_name):
    """Return (inputs dict, labels) of a tokenized split saved by the data step."""
    with np.load(os.path.join(out, "data", f"{split_name}.npz")) as arrays:
        inputs = {k: arrays[k] for k in ("input_word_ids", "input_mask", "input_type_ids")}
        return inputs, arrays["labels"]


def _dataset(out, split_name, batch_size, shuffle=False, seed=0):
    from tfcompress._keras import tf

    inputs, labels = load_split(out, split_name)
    ds = tf.data.Dataset.from_tensor_slices((inputs, labels))
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size)


# --------------------------------------------------------------------------- models


def _load_encoder(model):
    from tfcompress import bert

    if model["source"] == "minilm":
        return bert.load_minilm()
    if model["source"] == "huggingface":
        return bert.from_huggingface(model["path"])
    return bert.from_hub(model["path"])


def _save_model(model, path):
    """Save to ``path`` (.keras file or SavedModel folder) through a temporary name."""
    temporary = path + ".tmp" + (".keras" if path.endswith(".keras") else "")
    if os.path.isdir(temporary):
        shutil.rmtree(temporary)
    # Without the optimizer: its AdamW slots would triple the file (271 MB instead of 92 MB
    # for MiniLM) and the size the report compares against. The native .keras format has
    # no include_optimizer argument, so the optimizer is detached while saving.
    if path.endswith(".keras"):
        optimizer = getattr(model, "optimizer", None)
        model.optimizer = None
        try:
            model.save(temporary)
        finally:
            model.optimizer = optimizer
    else:
        model.save(temporary, include_optimizer=False)
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(temporary, path)
    return path


def _load_model(path):
    import tfcompress  # noqa: F401  (registers the custom layers)
    from tfcompress._keras import keras

    return keras.models.load_model(path, compile=False)


def step_baseline(recipe, out):
    from tfcompress import bert
    from tfcompress.train import fine_tune

    labels = json.load(open(os.path.join(out, "data", "labels.json"), encoding="utf-8"))
    encoder = _load_encoder(recipe["model"])
    model = bert.classifier(encoder, num_classes=len(labels), dropout=recipe["model"]["dropout"],
                            pooling=recipe["model"]["pooling"])
    train = recipe["train"]
    fine_tune(model, _dataset(out, "train", train["batch_size"], shuffle=True),
              _dataset(out, "validation", train["batch_size"]), epochs=train["epochs"],
              learning_rate=train["learning_rate"], precision=train["precision"],
              checkpoint_dir=os.path.join(out, "checkpoints", "baseline"),
              checkpoint_every="epoch")
    models = os.path.join(out, "models")
    os.makedirs(models, exist_ok=True)
    return [_save_model(model, os.path.join(models, "baseline.keras")),
            _save_model(model, os.path.join(models, "baseline_savedmodel"))]


def step_compress(recipe, out):
    from tfcompress.compress import Recipe, compress

    baseline = _load_model(os.path.join(out, "models", "baseline.keras"))
    rules = Recipe.from_dict({"compress": recipe["compress"]})
    inputs, _ = load_split(out, "train")
    calibration = {k: v[:256] for k, v in inputs.items()}
    small, report = compress(baseline, rules, calibration_data=calibration)
    path = _save_model(small, os.path.join(out, "models", "compressed.keras"))
    report_path = os.path.join(out, "compress_report.md")
    with open(report_path, "w", encoding="utf-8") as f:
        f.write(report.to_markdown() + "\n")
    json_path = os.path.join(out, "compress_report.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(report.to_dict(), f, indent=1)
    return [path, report_path, json_path]


def step_recovery(recipe, out):
    from tfcompress.train import fine_tune

    teacher = _load_model(os.path.join(out, "models", "baseline.keras"))
    student = _load_model(os.path.join(out, "models", "compressed.keras"))
    recovery = recipe["recovery"]
    fine_tune(student, _dataset(out, "train", recovery["batch_size"], shuffle=True, seed=1),
              _dataset(out, "validation", recovery["batch_size"]), epochs=recovery["epochs"],
              learning_rate=recovery["learning_rate"], precision=recovery["precision"],
              teacher=teacher, distill_alpha=recovery["distill_alpha"],
              temperature=recovery["temperature"],
              checkpoint_dir=os.path.join(out, "checkpoints", "recovery"),
              checkpoint_every="epoch")
    return [_save_model(student, os.path.join(out, "models", "recovered.keras"))]


def step_strip(recipe, out):
    from tfcompress.compress import strip

    recovered = _load_model(os.path.join(out, "models", "recovered.keras"))
    model = strip(recovered)
    # The same model with its fake quantization folded into the kernels: the float graph
    # that the weight-quantizing modes (dynamic, int4) and float modes convert.
    folded = strip(recovered, fold_quantization=True)
    models = os.path.join(out, "models")
    return [_save_model(model, os.path.join(models, "compressed_inference.keras")),
            _save_model(model, os.path.join(models, "compressed_savedmodel")),
            _save_model(folded, os.path.join(models, "compressed_folded.keras"))]


# --------------------------------------------------------------------------- export, evaluate


def _subset(inputs, count):
    return {k: v[:count] for k, v in inputs.items()}


def _export_plan(recipe, out):
    """Return (variant name, source model path, mode, TFLite path) for every export."""
    models = os.path.join(out, "models")
    folder = os.path.join(out, "tflite")
    plan = []
    for mode in recipe["export"]["baseline_modes"]:
        plan.append((f"baseline {mode}", os.path.join(models, "baseline.keras"), mode,
                     os.path.join(folder, f"baseline_{mode}.tflite")))
    for mode in recipe["export"]["modes"]:
        # int8 and int16x8 convert the fake-quant ranges learned in training; the other
        # modes quantize weights themselves, so they start from the folded float graph.
        source = ("compressed_inference.keras" if mode in ("int8", "int16x8")
                  else "compressed_folded.keras")
        plan.append((f"compressed {mode}", os.path.join(models, source), mode,
                     os.path.join(folder, f"compressed_{mode}.tflite")))
    return plan


def step_export(recipe, out):
    from tfcompress.export import VerificationError, to_tflite

    train, _ = load_split(out, "train")
    validation, _ = load_split(out, "validation")
    representative = _subset(train, 128)
    verify = _subset(validation, 64)
    os.makedirs(os.path.join(out, "tflite"), exist_ok=True)
    results, outputs = {}, []
    loaded = {}
    for name, source, mode, path in _export_plan(recipe, out):
        if source not in loaded:
            loaded[source] = _load_model(source)
        logger.info("export: %s -> %s", name, path)
        try:
            result = to_tflite(loaded[source], path, mode=mode,
                               representative_data=representative, verify_data=verify,
                               seq_length=recipe["data"]["seq_length"], overwrite=True,
                               tolerance=recipe["export"]["tolerance"].get(mode))
        except (VerificationError, NotImplementedError) as error:
            # A variant that fails verification, or that the runtime cannot run, is
            # reported as such, not shipped, and does not stop the other exports.
            logger.warning("export: %s failed:\n%s", name, error)
            results[name] = {"path": None, "mode": mode, "failed": str(error).splitlines()[0]}
            continue
        verification = result.verification
        results[name] = {
            "path": os.path.relpath(result.path, out), "mode": mode, "bytes": result.bytes,
            "gzip_bytes": result.gzip_bytes, "sparsity": result.sparsity,
            "seq_length": result.seq_length,
            "max_abs_diff": getattr(verification, "max_abs_diff", None),
            "cosine": getattr(verification, "cosine", None),
            "label_agreement": getattr(verification, "label_agreement", None),
            "float_tensors": list(result.float_tensors), "float_nodes": result.float_nodes,
        }
        outputs.append(result.path)
    summary = os.path.join(out, "tflite", "exports.json")
    with open(summary, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    return outputs + [summary]


def step_evaluate(recipe, out):
    from tfcompress.evaluate import evaluate_keras, evaluate_tflite, latency

    settings = recipe["evaluate"]
    test, labels = load_split(out, "test")
    example = _subset(test, 1)
    timing = dict(runs=settings["latency_runs"], warmup=settings["warmup_runs"],
                  num_threads=settings["num_threads"])
    rows = {}
    keras_variants = (("baseline float32 SavedModel", "baseline.keras", "baseline_savedmodel"),
                      ("compressed SavedModel", "compressed_inference.keras",
                       "compressed_savedmodel"))
    for name, keras_file, saved_model in keras_variants:
        logger.info("evaluate: %s", name)
        model = _load_model(os.path.join(out, "models", keras_file))
        evaluation = evaluate_keras(model, test, labels=labels)
        timed = latency(model, example, **timing)
        rows[name] = {"path": os.path.join("models", saved_model), "kind": "keras",
                      "accuracy": evaluation.accuracy, "macro_f1": evaluation.macro_f1,
                      "latency_median_ms": timed.median_ms, "latency_p90_ms": timed.p90_ms}
    with open(os.path.join(out, "tflite", "exports.json"), encoding="utf-8") as f:
        exports = json.load(f)
    failed = {name: entry["failed"] for name, entry in exports.items() if entry.get("failed")}
    partly_float = {name: entry for name, entry in exports.items() if entry.get("float_nodes")}
    for name, _, mode, path in _export_plan(recipe, out):
        if name in failed:
            continue
        logger.info("evaluate: %s", name)
        evaluation = evaluate_tflite(path, test, labels=labels, num_threads=settings["num_threads"])
        timed = latency(path, example, **timing)
        rows[name] = {"path": os.path.relpath(path, out), "kind": "tflite", "mode": mode,
                      "accuracy": evaluation.accuracy, "macro_f1": evaluation.macro_f1,
                      "latency_median_ms": timed.median_ms, "latency_p90_ms": timed.p90_ms}
    path = os.path.join(out, "evaluation.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"examples": int(len(labels)), "failed_exports": failed,
                   "float_tensors": {name: {"patterns": entry["float_tensors"],
                                            "operators": entry["float_nodes"]}
                                     for name, entry in partly_float.items()},
                   "latency_runs": settings["latency_runs"],
                   "warmup_runs": settings["warmup_runs"], "num_threads": settings["num_threads"],
                   "variants": rows}, f, indent=1)
    return [path]


def regenerate_report(out):
    """Rewrite the report files of a finished job folder from its evaluation.json.

    The wall time recorded in an existing summary.json is kept.
    """
    recipe_path = os.path.join(out, "recipe.resolved.yaml")
    if not os.path.isfile(recipe_path):
        raise FileNotFoundError(f"{out!r} has no recipe.resolved.yaml; run "
                                f"`tfcompress run RECIPE --out {out}` to write it.")
    with open(recipe_path, encoding="utf-8") as f:
        recipe = yaml.safe_load(f)
    wall_seconds = None
    summary_path = os.path.join(out, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            wall_seconds = json.load(f).get("wall_seconds")
    return step_report(recipe, out, wall_seconds)


def step_report(recipe, out, wall_seconds):
    from tfcompress.export import SizeReport, Variant

    with open(os.path.join(out, "evaluation.json"), encoding="utf-8") as f:
        evaluation = json.load(f)
    variants = []
    for name, row in evaluation["variants"].items():
        size_path = os.path.join(out, row["path"])
        variant = Variant.measure(name, size_path, kind=row["kind"], mode=row.get("mode"))
        variant.accuracy = row["accuracy"]
        variant.macro_f1 = row["macro_f1"]
        variant.latency_median_ms = row["latency_median_ms"]
        variant.latency_p90_ms = row["latency_p90_ms"]
        if row["kind"] == "keras":
            variant.nonzero_fraction = _keras_nonzero(os.path.join(out, row["path"]))
        variants.append(variant)
    report = SizeReport(variants, keras_baseline="baseline float32 SavedModel",
                        tflite_baseline="baseline float32")
    paths = report.save(out)
    if evaluation.get("float_tensors"):
        with open(paths["md"], "a", encoding="utf-8") as f:
            f.write("\nint8 variants that keep part of the residual stream in float32 to meet "
                    "their tolerance (LayerNormalization statistics are float32 in every "
                    "int8 variant):\n\n")
            for name, float_part in evaluation["float_tensors"].items():
                f.write(f"- {name}: {float_part['operators']} operators matching "
                        f"{', '.join(float_part['patterns'])}\n")
    if evaluation["failed_exports"]:
        with open(paths["md"], "a", encoding="utf-8") as f:
            f.write("\nExports that failed (verification against their Keras model, or a "
                    "mode the runtime cannot run) and were not written:\n\n")
            for name, message in evaluation["failed_exports"].items():
                f.write(f"- {name}: {message}\n")

    # The headline: the smallest compressed TFLite file against the float32 SavedModel.
    rows = {row["name"]: row for row in report.rows()}
    baseline = rows["baseline float32 SavedModel"]
    compressed = [r for n, r in rows.items() if n.startswith("compressed ") and r["kind"] == "tflite"]
    summary = {"examples": evaluation["examples"], "quick": recipe["quick"],
               "baseline_accuracy": baseline["accuracy"], "wall_seconds": wall_seconds}
    if compressed:
        best = min(compressed, key=lambda r: r["bytes"])
        summary.update(
            compressed_variant=best["name"], compressed_bytes=best["bytes"],
            baseline_savedmodel_bytes=baseline["bytes"],
            size_reduction=baseline["bytes"] / best["bytes"],
            compressed_accuracy=best["accuracy"],
            accuracy_drop_points=100 * (baseline["accuracy"] - best["accuracy"]))
    summary_path = os.path.join(out, "summary.json")
    with open(summary_path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return list(paths.values()) + [summary_path]


def _keras_nonzero(path):
    from tfcompress.export.report import keras_nonzero_fraction

    keras_file = {"baseline_savedmodel": "baseline.keras",
                  "compressed_savedmodel": "compressed_inference.keras"}.get(os.path.basename(path))
    if keras_file is None:
        return None
    return keras_nonzero_fraction(_load_model(os.path.join(os.path.dirname(path), keras_file)))


# --------------------------------------------------------------------------- driver


def run_job(recipe_path, out, quick=False, force=False):
    """Run (or resume) the main job described by ``recipe_path``, writing into ``out``.

    Returns the summary dict also written to ``out/summary.json``.
    """
    recipe = load_job_recipe(recipe_path, quick=quick)
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out!r} exists and is not a folder; choose another path.")
    # Validate the compression rules before any training, so a typo fails in seconds.
    _check_against_model(recipe)
    os.makedirs(out, exist_ok=True)

    resolved_path = os.path.join(out, "recipe.resolved.yaml")
    with open(resolved_path + ".tmp", "w", encoding="utf-8") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    os.replace(resolved_path + ".tmp", resolved_path)

    cache = StepCache(out)
    if force:
        cache.invalidate_from(STEPS[0])
    started = time.time()
    sections = {
        "data": ("model", "data"), "baseline": ("model", "train"), "compress": ("compress",),
        "recovery": ("recovery",), "strip": (), "export": ("export",), "evaluate": ("evaluate",),
        "report": (),
    }
    runners = {"data": step_data, "baseline": step_baseline, "compress": step_compress,
               "recovery": step_recovery, "strip": step_strip, "export": step_export,
               "evaluate": step_evaluate,
               "report": lambda r, o: step_report(r, o, round(time.time() - started))}
    previous_key = ""
    rerun = False
    for number, step in enumerate(STEPS, start=1):
        key = _key(previous_key, [recipe[s] for s in sections[step]], recipe["quick"])
        if not rerun and cache.is_done(step, key):
            logger.info("[%d/%d] %s: outputs are up to date, skipped", number, len(STEPS), step)
            previous_key = key
            continue
        rerun = True
        cache.invalidate_from(step)
        logger.info("[%d/%d] %s: running", number, len(STEPS), step)
        begin = time.time()
        outputs = runners[step](recipe, out)
        cache.record(step, key, outputs, time.time() - begin)
        logger.info("[%d/%d] %s: done in %.0f s", number, len(STEPS), step, time.time() - begin)
        previous_key = key
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        return json.load(f)
