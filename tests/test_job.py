"""Tests of the main job: recipe loading, step markers, resuming, and one quick real run."""

import json
import os
import time

import pytest
import yaml

from tfcompress import job

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "data", "recipes", "minilm_tweets.yaml")


def write_recipe(tmp_path, content):
    path = tmp_path / "recipe.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return str(path)


# --------------------------------------------------------------------------- load_job_recipe


def test_recipe_quick_overrides():
    full = job.load_job_recipe(RECIPE)
    quick = job.load_job_recipe(RECIPE, quick=True)
    assert full["data"]["max_train"] == 4000
    assert full["data"]["seq_length"] == 48
    assert quick["data"]["max_train"] == 96
    assert quick["data"]["seq_length"] == 16
    assert quick["train"]["batch_size"] == 16
    # Keys the quick section leaves out keep the full recipe's values.
    assert quick["train"]["learning_rate"] == full["train"]["learning_rate"]
    assert quick["quick"] is True
    assert full["quick"] is False
    assert quick["compress"] == full["compress"]


def test_recipe_defaults_filled(tmp_path):
    recipe = job.load_job_recipe(write_recipe(tmp_path, {"train": {"epochs": 3}}))
    assert recipe["train"] == {"epochs": 3, "batch_size": 32, "learning_rate": 5e-5,
                               "precision": "float32"}
    assert recipe["model"]["source"] == "minilm"
    assert recipe["compress"] == []


@pytest.mark.parametrize("content, message", [
    ({"modle": {"source": "minilm"}}, "unknown sections ['modle']"),
    ({"train": {"epoch": 2}}, "recipe section 'train' has unknown keys ['epoch']"),
    ({"model": {"source": "onnx"}}, "model.source must be minilm, hub or huggingface; "
                                    "received 'onnx'"),
    ({"model": {"source": "hub"}}, "model.source='hub' needs model.path"),
    ({"model": {"source": "huggingface"}}, "model.source='huggingface' needs model.path"),
    ({"data": {"source": "csv"}}, "data.source=csv needs data.path"),
    ({"data": {"source": "parquet"}}, "data.source must be tweets or csv; received 'parquet'"),
    ("train: {epochs: [1\n", "is not valid YAML"),
    ("- just\n- a list\n", "must be a mapping of sections; received list"),
    ({"train": 5}, "recipe section 'train'"),
    ({"compress": {"match": "pooler"}}, "recipe section 'compress'"),
    ({"train": {"batch_size": 0}}, "train.batch_size must be a positive integer; received 0"),
    ({"recovery": {"precision": "float64"}}, "recovery.precision must be float32"),
    ({"data": {"seq_length": 2}}, "data.seq_length must be at least 3"),
    ({"model": {"pooling": "cls"}}, "model.pooling must be mean or pooled; received 'cls'"),
    ({"export": {"modes": "int8"}}, "export.modes must be a list"),
])
def test_recipe_errors(tmp_path, content, message):
    with pytest.raises(ValueError) as error:
        job.load_job_recipe(write_recipe(tmp_path, content))
    assert message in str(error.value)


def test_recipe_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe file not found"):
        job.load_job_recipe(str(tmp_path / "absent.yaml"))
    missing_csv = str(tmp_path / "absent.csv")
    with pytest.raises(FileNotFoundError, match="data.path not found"):
        job.load_job_recipe(write_recipe(tmp_path, {"data": {"source": "csv",
                                                             "path": missing_csv}}))


# --------------------------------------------------------------------------- StepCache


def test_step_cache_records_and_checks(tmp_path):
    out = str(tmp_path)
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"12345")
    folder = tmp_path / "savedmodel"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"ab")
    (folder / "variables" / "v.data").write_bytes(b"abc")

    cache = job.StepCache(out)
    cache.record("baseline", "key1", [str(model_file), str(folder)], seconds=1.0)
    marker = json.loads((tmp_path / ".steps" / "baseline.json").read_text())
    assert marker["key"] == "key1"
    assert marker["outputs"] == {"model.bin": 5, "savedmodel": {
        "saved_model.pb": 2, os.path.join("variables", "v.data"): 3}}

    assert cache.is_done("baseline", "key1")
    assert not cache.is_done("baseline", "key2")
    assert not cache.is_done("compress", "key1")


@pytest.mark.parametrize("change", ["edit file", "delete file", "add to folder",
                                    "delete folder"])
def test_step_cache_detects_changes(tmp_path, change):
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"12345")
    folder = tmp_path / "savedmodel"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(b"ab")
    cache = job.StepCache(str(tmp_path))
    cache.record("baseline", "key", [str(model_file), str(folder)], seconds=0.0)

    if change == "edit file":
        model_file.write_bytes(b"123456")
    elif change == "delete file":
        model_file.unlink()
    elif change == "add to folder":
        (folder / "extra.txt").write_bytes(b"x")
    else:
        (folder / "saved_model.pb").unlink()
        folder.rmdir()
    assert not cache.is_done("baseline", "key")


def test_step_cache_invalidate_from(tmp_path):
    cache = job.StepCache(str(tmp_path))
    for step in job.STEPS:
        cache.record(step, "key", [], seconds=0.0)
    cache.invalidate_from("recovery")
    left = sorted(p.stem for p in (tmp_path / ".steps").glob("*.json"))
    assert left == sorted(["data", "baseline", "compress"])


# --------------------------------------------------------------------------- run_job driver


@pytest.fixture
def fake_steps(monkeypatch):
    """Replace every step with one that writes ``<step>.txt`` and counts its calls."""
    calls = []

    def make(step):
        def run(recipe, out, *rest):
            calls.append(step)
            path = os.path.join(out, f"{step}.txt")
            with open(path, "w", encoding="utf-8") as f:
                f.write(f"{step} output")
            if step == "report":
                summary = os.path.join(out, "summary.json")
                with open(summary, "w", encoding="utf-8") as f:
                    json.dump({"examples": 1}, f)
                return [path, summary]
            return [path]
        return run

    for step in job.STEPS:
        monkeypatch.setattr(job, f"step_{step}", make(step))
    return calls


def test_run_job_skips_finished_steps(tmp_path, fake_steps):
    out = str(tmp_path / "out")
    assert job.run_job(RECIPE, out, quick=True) == {"examples": 1}
    assert fake_steps == list(job.STEPS)

    fake_steps.clear()
    job.run_job(RECIPE, out, quick=True)
    assert fake_steps == []


@pytest.mark.parametrize("change", ["edit", "delete"])
def test_run_job_reruns_from_changed_step(tmp_path, fake_steps, change):
    out = tmp_path / "out"
    job.run_job(RECIPE, str(out), quick=True)
    fake_steps.clear()
    if change == "edit":
        (out / "recovery.txt").write_text("a longer, different recovery output")
    else:
        (out / "recovery.txt").unlink()
    job.run_job(RECIPE, str(out), quick=True)
    # The changed step and every step after it run again, and the earlier ones are skipped.
    assert fake_steps == ["recovery", "strip", "export", "evaluate", "report"]


def test_run_job_reruns_on_recipe_change(tmp_path, fake_steps):
    out = str(tmp_path / "out")
    job.run_job(RECIPE, out, quick=True)
    fake_steps.clear()
    # The full recipe differs from the quick one in the data section, which every step
    # depends on through the chain of keys.
    job.run_job(RECIPE, out, quick=False)
    assert fake_steps == list(job.STEPS)
    fake_steps.clear()
    job.run_job(RECIPE, out, quick=False, force=True)
    assert fake_steps == list(job.STEPS)


def test_run_job_rejects_file_as_out(tmp_path, fake_steps):
    out = tmp_path / "taken"
    out.write_text("a file")
    with pytest.raises(FileExistsError, match="is not a folder"):
        job.run_job(RECIPE, str(out))
    assert fake_steps == []


# --------------------------------------------------------------------------- real quick run


def test_run_job_checks_rules_before_work(tmp_path):
    recipe = write_recipe(tmp_path, {"compress": [
        {"match": r"transformer/layer_\d+/ffn/intermediat", "low_rank": {"rank": 8}}]})
    out = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        job.run_job(recipe, str(out), quick=True)
    assert "transformer/layer_5/ffn/intermediate" in str(error.value)
    assert not out.exists()


def test_run_job_checks_sequence_length(tmp_path):
    recipe = write_recipe(tmp_path, {"data": {"seq_length": 600}})
    with pytest.raises(ValueError, match="exceeds the model's 512 position embeddings"):
        job.run_job(recipe, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_quick_job_end_to_end(tmp_path):
    """The whole job in quick mode on the embedded MiniLM and tweets, then a resumed rerun."""
    out = str(tmp_path / "job")
    started = time.time()
    summary = job.run_job(RECIPE, out, quick=True)
    first_seconds = time.time() - started

    for name in ("report.md", "report.json", "report.png", "summary.json", "evaluation.json",
                 "recipe.resolved.yaml", os.path.join("tflite", "exports.json")):
        assert os.path.isfile(os.path.join(out, name)), name

    # Every size in the report is the size on disk of the file it names.
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    rows = {row["name"]: row for row in report["variants"]}
    for row in report["variants"]:
        if row["kind"] == "tflite":
            assert row["bytes"] == os.path.getsize(row["path"]), row["name"]
        else:
            folder_bytes = sum(os.path.getsize(os.path.join(root, name))
                               for root, _, names in os.walk(row["path"]) for name in names)
            assert row["bytes"] == folder_bytes, row["name"]
    assert report["keras_baseline"] == "baseline float32 SavedModel"

    # summary.json agrees with the report rows and the quick recipe.
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        assert json.load(f) == summary
    assert summary["quick"] is True
    assert summary["examples"] == 64
    baseline = rows["baseline float32 SavedModel"]
    assert summary["baseline_accuracy"] == baseline["accuracy"]
    assert "size_reduction" in summary, "no compressed TFLite variant passed verification"
    best = rows[summary["compressed_variant"]]
    assert best["kind"] == "tflite"
    assert summary["compressed_bytes"] == best["bytes"]
    assert summary["baseline_savedmodel_bytes"] == baseline["bytes"]
    assert summary["size_reduction"] == pytest.approx(baseline["bytes"] / best["bytes"])
    assert summary["accuracy_drop_points"] == pytest.approx(
        100 * (baseline["accuracy"] - best["accuracy"]))
    for row in rows.values():
        # 64 test examples: every accuracy is a multiple of 1/64.
        assert round(row["accuracy"] * 64, 6) == round(row["accuracy"] * 64)

    # A rerun skips every step: no marker is rewritten and it takes a fraction of the time.
    steps = os.path.join(out, ".steps")
    marker_times = {name: os.stat(os.path.join(steps, name)).st_mtime_ns
                    for name in os.listdir(steps)}
    assert sorted(marker_times) == sorted(f"{step}.json" for step in job.STEPS)
    started = time.time()
    assert job.run_job(RECIPE, out, quick=True) == summary
    second_seconds = time.time() - started
    assert {name: os.stat(os.path.join(steps, name)).st_mtime_ns
            for name in os.listdir(steps)} == marker_times
    assert second_seconds < first_seconds / 5
