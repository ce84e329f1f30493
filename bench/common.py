"""Pieces shared by the benchmark items: settings, the job's models and data, TFLite.

The plain TFLite conversions here are what a user of ``tf.lite.TFLiteConverter`` writes
without tfcompress: a batch-1 concrete function and the converter's documented options.
"""

import dataclasses
import json
import logging
import os
import re

import numpy as np

from tfcompress._keras import keras, tf

logger = logging.getLogger(__name__)

INPUT_NAMES = ("input_word_ids", "input_mask", "input_type_ids")
RECIPES = os.path.join(os.path.dirname(__file__), "recipes")
# Smoke runs use a hidden width of 32, so recipe ranks written for MiniLM (hidden 384)
# are divided by this factor to stay below the kernels' smaller side.
SMOKE_RANK_DIVISOR = 8
# Output folder of `make demo`, read by full runs unless --job-dir is given.
DEFAULT_JOB_DIR = os.path.join("runs", "minilm_tweets")
_ERROR_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception)\b.*:")


class NotRun(Exception):
    """Raised when an item cannot run here; the message gives the reason."""


@dataclasses.dataclass
class Settings:
    """Options of one benchmark run.

    Attributes:
      smoke: toy sizes and few repetitions, to check the harness.
      out: folder for results.json, models and temporary files.
      job_dir: output folder of ``tfcompress run``, or None for the default (a tiny
        generated job in smoke runs, ``DEFAULT_JOB_DIR`` otherwise).
    """

    smoke: bool
    out: str
    job_dir: str = None

    def pick(self, full, smoke):
        """Return ``smoke`` in a smoke run, else ``full``."""
        return smoke if self.smoke else full

    def folder(self, *parts):
        """Return (and create) a folder under ``out``."""
        path = os.path.join(self.out, *parts)
        os.makedirs(path, exist_ok=True)
        return path


def short_error(error, limit=200):
    """Return ``Type: first line of the message`` for a result row.

    Keras wraps errors raised inside a layer's call in a first line "Exception
    encountered when calling layer ...", so the line with the cause is added.
    """
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text.startswith("Exception encountered") and len(lines) > 1:
        # A traceback of the traced function and the call arguments may follow, so the
        # cause is the last line that names an error type, else the second line.
        causes = [line for line in lines[1:] if _ERROR_LINE.match(line)]
        text = f"{text} {causes[-1] if causes else lines[1]}"
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------- job data


@dataclasses.dataclass
class Job:
    """The fine-tuned float baseline and the tokenized splits of a main-job folder."""

    folder: str
    baseline_keras: str
    baseline_savedmodel: str
    splits: dict
    report_json: str = None

    def inputs(self, split, limit=None):
        arrays = self.splits[split]
        return {k: arrays[k][:limit] for k in INPUT_NAMES}

    def labels(self, split, limit=None):
        return self.splits[split]["labels"][:limit]

    @property
    def seq_length(self):
        return int(self.splits["test"]["input_word_ids"].shape[1])

    def load_baseline(self):
        import tfcompress  # noqa: F401  (registers the custom layers for loading)

        return keras.models.load_model(self.baseline_keras, compile=False)

    def dataset(self, split, batch_size, limit=None, shuffle=False):
        data = tf.data.Dataset.from_tensor_slices((self.inputs(split, limit),
                                                   self.labels(split, limit)))
        if shuffle:
            data = data.shuffle(10_000, seed=0)
        return data.batch(batch_size)


def load_job(folder):
    """Read a main-job output folder; raise NotRun naming what is missing."""
    command = "tfcompress run data/recipes/minilm_tweets.yaml --out " + folder
    if not os.path.isdir(folder):
        raise NotRun(f"the main-job folder {folder!r} does not exist; run `{command}` or "
                     "pass --job-dir")
    paths = {
        "baseline_keras": os.path.join(folder, "models", "baseline.keras"),
        "baseline_savedmodel": os.path.join(folder, "models", "baseline_savedmodel"),
    }
    splits = {}
    for split in ("train", "validation", "test"):
        paths[split] = os.path.join(folder, "data", f"{split}.npz")
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        raise NotRun(f"the main-job folder {folder!r} lacks {missing}; run `{command}`")
    for split in ("train", "validation", "test"):
        with np.load(paths[split]) as arrays:
            splits[split] = {k: arrays[k] for k in INPUT_NAMES + ("labels",)}
    report = os.path.join(folder, "report.json")
    return Job(folder, paths["baseline_keras"], paths["baseline_savedmodel"], splits,
               report if os.path.isfile(report) else None)


def make_smoke_job(folder):
    """Write a tiny main-job folder: a 2-layer, hidden-32 classifier on 256 tweets.

    Used by smoke runs that have no real job folder; its accuracy means nothing.
    """
    if os.path.isfile(os.path.join(folder, "models", "baseline.keras")):
        return load_job(folder)
    from tfcompress import bert
    from tfcompress.job import step_data
    from tfcompress.train import fine_tune

    recipe = {"model": {"source": "minilm", "path": None},
              "data": {"source": "tweets", "seq_length": 16, "max_train": 256,
                       "max_validation": 32, "max_test": 64}}
    step_data(recipe, folder)
    config = bert.BertConfig(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=4,
                             intermediate_size=64, max_position_embeddings=64)
    model = bert.classifier(bert.build_encoder(config), num_classes=3, pooling="mean")
    job = Job(folder, "", "", {})
    for split in ("train", "validation", "test"):
        with np.load(os.path.join(folder, "data", f"{split}.npz")) as arrays:
            job.splits[split] = {k: arrays[k] for k in INPUT_NAMES + ("labels",)}
    fine_tune(model, job.dataset("train", 32), epochs=1, learning_rate=1e-3, verbose=0)
    models = os.path.join(folder, "models")
    os.makedirs(models, exist_ok=True)
    model.save(os.path.join(models, "baseline.keras"))
    model.save(os.path.join(models, "baseline_savedmodel"))
    return load_job(folder)


def job_for(settings):
    """Return the job of ``--job-dir``; without one, a smoke job or the default folder."""
    if settings.job_dir:
        return load_job(settings.job_dir)
    if settings.smoke:
        return make_smoke_job(os.path.join(settings.out, "smoke_job"))
    return load_job(DEFAULT_JOB_DIR)


def load_recipe(name, smoke):
    """Load ``bench/recipes/<name>.yaml`` as a tfcompress Recipe (ranks scaled for smoke)."""
    import yaml

    from tfcompress.compress import Recipe

    path = os.path.join(RECIPES, f"{name}.yaml")
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    if smoke:
        for rule in config["compress"]:
            low_rank = rule.get("low_rank") or {}
            if "rank" in low_rank:
                low_rank["rank"] = max(1, low_rank["rank"] // SMOKE_RANK_DIVISOR)
    return Recipe.from_dict(config)


# --------------------------------------------------------------------------- TFLite


def batch1_concrete_function(model, seq_length):
    """Trace ``model`` for int32 inputs of shape [1, seq_length]."""
    specs = {name: tf.TensorSpec([1, seq_length], tf.int32, name=name)
             for name in INPUT_NAMES}
    function = tf.function(lambda inputs: model(inputs, training=False))
    return function.get_concrete_function(specs)


def plain_tflite(model, seq_length, mode, representative=None):
    """Convert with ``tf.lite.TFLiteConverter`` as its guide shows; return the bytes.

    Modes: "float32" (no options), "dynamic" (``Optimize.DEFAULT``), "float16"
    (``DEFAULT`` with float16 supported types) and "int8" (``DEFAULT``, a
    representative dataset and ``TFLITE_BUILTINS_INT8`` only, so the conversion fails
    rather than keep float operators).
    """
    concrete = batch1_concrete_function(model, seq_length)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)
    if mode in ("dynamic", "float16", "int8"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode == "int8":
        if representative is None:
            raise ValueError("mode 'int8' needs representative inputs; received None.")

        def examples():
            for i in range(len(representative["input_word_ids"])):
                yield {k: representative[k][i:i + 1].astype(np.int32) for k in INPUT_NAMES}

        converter.representative_dataset = examples
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def write_bytes(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    return path


def size_row(path):
    """Return ``{"bytes", "gzip_bytes"}`` measured from a file or folder on disk."""
    from tfcompress.export import measure_path

    size, gzipped = measure_path(path)
    return {"bytes": int(size), "gzip_bytes": int(gzipped)}


def read_main_job_report(path):
    """Return the variants of the main job's report.json (a list of dicts)."""
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    variants = report.get("variants") if isinstance(report, dict) else None
    if not isinstance(variants, list):
        raise ValueError(f"{path!r} has no 'variants' list; its keys are "
                         f"{sorted(report) if isinstance(report, dict) else type(report).__name__}.")
    return variants


def slug(text):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
