"""Tests of the tfcompress command line: argument checks, exit codes and each command's output."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from tfcompress import cli
from tfcompress._keras import keras

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_EXAMPLES = 16
SEQ_LENGTH = 8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny classifier saved as .keras and SavedModel, and a labelled .npz for it.

    The first half of the labels are the model's own predictions and the second half
    are shifted by one class, so its accuracy on the file is exactly 0.5.
    """
    from tfcompress.bert import BertConfig, build_encoder, classifier

    folder = tmp_path_factory.mktemp("cli")
    config = BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64, max_position_embeddings=64,
                        dropout_rate=0.0, attention_dropout_rate=0.0)
    keras.utils.set_random_seed(7)
    model = classifier(build_encoder(config), num_classes=3, dropout=0.0)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, size=(NUM_EXAMPLES, SEQ_LENGTH)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::2, 6:] = 0
    ids[::2, 6:] = 0
    inputs = {"input_word_ids": ids, "input_mask": mask, "input_type_ids": np.zeros_like(ids)}
    predictions = model.predict(inputs, verbose=0).argmax(axis=1)
    labels = predictions.copy()
    labels[NUM_EXAMPLES // 2:] = (labels[NUM_EXAMPLES // 2:] + 1) % 3

    paths = {
        "keras": str(folder / "tiny.keras"),
        "savedmodel": str(folder / "tiny_savedmodel"),
        "npz": str(folder / "data.npz"),
        "unlabelled": str(folder / "unlabelled.npz"),
        "folder": folder,
    }
    model.save(paths["keras"])
    model.save(paths["savedmodel"])
    np.savez(paths["npz"], labels=labels.astype(np.int32), **inputs)
    np.savez(paths["unlabelled"], **inputs)
    return {"paths": paths, "params": model.count_params(), "labels": labels,
            "predictions": predictions}


def run_cli(capsys, *argv):
    """Run ``main(argv)``; return (exit status, stdout, stderr)."""
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def hand_macro_f1(labels, predictions, num_classes=3):
    scores = []
    for c in range(num_classes):
        tp = np.sum((predictions == c) & (labels == c))
        fp = np.sum((predictions == c) & (labels != c))
        fn = np.sum((predictions != c) & (labels == c))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


# --------------------------------------------------------------------------- usage errors


def test_choices_match_library():
    from tfcompress.export import MODES
    from tfcompress.memory.estimate import OPTIMIZER_SLOTS

    parser = cli.build_parser()
    actions = {a.dest: a for a in parser._subparsers._group_actions[0].choices["export"]._actions}
    assert tuple(actions["mode"].choices) == MODES
    actions = {a.dest: a for a in parser._subparsers._group_actions[0].choices["memory"]._actions}
    assert sorted(actions["optimizer"].choices) == sorted(OPTIMIZER_SLOTS)


def test_help_exits_zero(capsys):
    status, out, _ = run_cli(capsys, "export", "--help")
    assert status == 0
    assert "--calibration-data" in out
    assert "int16x8" in out


@pytest.mark.parametrize("argv, message", [
    ([], "required: COMMAND"),
    (["export", "model.keras", "--out", "x.tflite"], "--mode"),
    (["export", "model.keras", "--mode", "int3", "--out", "x.tflite"], "invalid choice: 'int3'"),
    (["memory", "--minilm", "--batch-size", "0", "--seq-length", "8"],
     "expected a positive integer; received '0'"),
    (["evaluate", "m.tflite", "--data", "/no/such/data.npz"], "path not found: '/no/such/data.npz'"),
    (["-v", "inspect", "x", "-q"], "--verbose and --quiet exclude each other"),
])
def test_argparse_errors_exit_2(capsys, argv, message):
    status, _, err = run_cli(capsys, *argv)
    assert status == 2
    assert message in err


def test_missing_model_exits_2(capsys, tmp_path):
    missing = tmp_path / "absent.keras"
    status, _, err = run_cli(capsys, "inspect", missing)
    assert status == 2
    assert f"model not found: {str(missing)!r}" in err


def test_unknown_model_kind_exits_2(capsys, tmp_path):
    text_file = tmp_path / "weights.txt"
    text_file.write_text("not a model")
    status, _, err = run_cli(capsys, "export", text_file, "--mode", "float32",
                             "--out", tmp_path / "x.tflite")
    assert status == 2
    assert "expected a .tflite file, a .keras file or a SavedModel folder" in err


def test_export_output_checks_exit_2(capsys, files, tmp_path):
    paths = files["paths"]
    status, _, err = run_cli(capsys, "export", paths["keras"], "--mode", "float32",
                             "--out", tmp_path / "model.bin")
    assert status == 2
    assert "--out must end with .tflite" in err

    existing = tmp_path / "existing.tflite"
    existing.write_bytes(b"keep me")
    status, _, err = run_cli(capsys, "export", paths["keras"], "--mode", "float32",
                             "--out", existing)
    assert status == 2
    assert "pass --overwrite" in err
    assert existing.read_bytes() == b"keep me"


def test_npz_without_labels_exits_2(capsys, files):
    paths = files["paths"]
    status, _, err = run_cli(capsys, "evaluate", paths["keras"], "--data", paths["unlabelled"],
                             "--latency-runs", 0)
    assert status == 2
    assert "lacks the arrays ['labels']" in err


def test_npz_length_mismatch_exits_2(capsys, tmp_path, files):
    bad = tmp_path / "bad.npz"
    np.savez(bad, input_word_ids=np.ones((4, 8), np.int32), input_mask=np.ones((4, 8), np.int32),
             input_type_ids=np.zeros((4, 8), np.int32), labels=np.zeros(3, np.int32))
    status, _, err = run_cli(capsys, "evaluate", files["paths"]["keras"], "--data", bad)
    assert status == 2
    assert "arrays of different lengths" in err
    assert "'labels': 3" in err


def test_memory_needs_one_source(capsys, files):
    status, _, err = run_cli(capsys, "memory", "--batch-size", 2, "--seq-length", 8)
    assert status == 2
    assert "either MODEL" in err
    status, _, err = run_cli(capsys, "memory", files["paths"]["keras"], "--minilm",
                             "--batch-size", 2, "--seq-length", 8)
    assert status == 2


def test_compress_recipe_errors(capsys, files, tmp_path):
    paths = files["paths"]
    broken = tmp_path / "broken.yaml"
    broken.write_text("compress: [unclosed\n")
    status, _, err = run_cli(capsys, "compress", paths["keras"], "--recipe", broken,
                             "--out", tmp_path / "out.keras")
    assert status == 2
    assert "is not valid YAML" in err

    unmatched = tmp_path / "unmatched.yaml"
    unmatched.write_text(yaml.safe_dump({"compress": [
        {"match": "no_such_layer", "low_rank": {"rank": 2}}]}))
    status, _, err = run_cli(capsys, "compress", paths["keras"], "--recipe", unmatched,
                             "--out", tmp_path / "out.keras")
    assert status == 1
    assert "no_such_layer" in err
    assert not (tmp_path / "out.keras").exists()


def test_tweet_calibration_needs_minilm_vocab(capsys, files, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"compress": [
        {"match": r"transformer/layer_\d+/ffn/intermediate", "low_rank": {"rank": 4}}]}))
    status, _, err = run_cli(capsys, "compress", files["paths"]["keras"], "--recipe", recipe,
                             "--out", tmp_path / "out.keras", "--calibration", 8)
    assert status == 2
    assert "the model's word embedding sizes are [100]" in err
    assert not (tmp_path / "out.keras").exists()


def test_report_without_job_exits_2(capsys, tmp_path):
    status, _, err = run_cli(capsys, "report", tmp_path)
    assert status == 2
    assert "has no evaluation.json" in err


def test_module_entry_point(tmp_path):
    missing = str(tmp_path / "absent.keras")
    completed = subprocess.run([sys.executable, "-m", "tfcompress", "inspect", missing],
                               cwd=REPOSITORY, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert f"tfcompress inspect: model not found: {missing!r}" in completed.stderr


# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize("kind", ["keras", "savedmodel"])
def test_inspect_parameter_total(capsys, files, kind):
    status, out, _ = run_cli(capsys, "inspect", files["paths"][kind], "--batch-size", 2,
                             "--seq-length", SEQ_LENGTH)
    assert status == 0
    total = re.search(r"total: ([\d,]+) parameters", out)
    assert int(total.group(1).replace(",", "")) == files["params"]
    rows = re.findall(r"^\| \S+ \| \w+ \| ([\d,]+) \|", out, flags=re.MULTILINE)
    assert sum(int(r.replace(",", "")) for r in rows) == files["params"]
    # float32 weights: 4 bytes per parameter in the memory estimate's weights row.
    assert f"| weights | {4 * files['params']} |" in out


def test_memory_tiny_model(capsys, files):
    status, out, _ = run_cli(capsys, "memory", files["paths"]["keras"], "--batch-size", 2,
                             "--seq-length", SEQ_LENGTH, "--optimizer", "sgd")
    assert status == 0
    params = files["params"]
    assert f"{params:,} parameters, batch 2, sequence 8, sgd" in out
    weights_mib = f"{4 * params / 2**20:.2f} MiB"
    assert f"| weights | {weights_mib} | {weights_mib} | {weights_mib} |" in out
    # sgd keeps no optimizer state.
    assert "| optimizer slots | 0.00 MiB | 0.00 MiB | 0.00 MiB |" in out
    assert "| part | float32 | mixed_float16 | mixed_float16 + recompute |" in out


def test_export_and_evaluate(capsys, files, tmp_path):
    paths = files["paths"]
    tflite = tmp_path / "tiny_float32.tflite"
    status, out, _ = run_cli(capsys, "export", paths["keras"], "--mode", "float32",
                             "--out", tflite, "--calibration-data", paths["npz"])
    assert status == 0
    assert f"bytes: {os.path.getsize(tflite):,} " in out
    assert "verification on 16 examples" in out
    assert "input_word_ids int32[1, 8]" in out

    labels, predictions = files["labels"], files["predictions"]
    expected_f1 = hand_macro_f1(labels, predictions)
    for model in (paths["keras"], str(tflite)):
        status, out, _ = run_cli(capsys, "evaluate", model, "--data", paths["npz"],
                                 "--latency-runs", 3, "--warmup-runs", 1)
        assert status == 0
        assert "examples: 16" in out
        # Half the labels are the Keras predictions, and float32 TFLite keeps every argmax.
        assert "accuracy: 0.5000" in out
        assert f"macro F1: {expected_f1:.4f}" in out
        assert "(3 runs after 1 warmup runs)" in out

    status, out, _ = run_cli(capsys, "inspect", tflite)
    assert status == 0
    assert f"file size: {os.path.getsize(tflite):,} bytes" in out
    assert "FULLY_CONNECTED x" in out

    # An existing file is replaced only with --overwrite.
    status, out, _ = run_cli(capsys, "export", paths["keras"], "--mode", "dynamic",
                             "--out", tflite, "--calibration-data", paths["npz"],
                             "--overwrite", "--examples", 4, "--verify-examples", 4)
    assert status == 0
    assert "mode: dynamic" in out
    assert "verification on 4 examples" in out


def test_export_int8_without_data_fails(capsys, files, tmp_path):
    out_path = tmp_path / "int8.tflite"
    status, _, err = run_cli(capsys, "export", files["paths"]["keras"], "--mode", "int8",
                             "--out", out_path, "--seq-length", SEQ_LENGTH)
    assert status == 1
    assert "needs representative_data" in err
    assert not out_path.exists()


def test_compress_low_rank(capsys, files, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"compress": [
        {"match": r"transformer/layer_\d+/ffn/intermediate", "low_rank": {"rank": 4}}]}))
    out_path = tmp_path / "small.keras"
    status, out, err = run_cli(capsys, "compress", files["paths"]["keras"], "--recipe", recipe,
                               "--out", out_path)
    assert status == 0, err
    # Each 32x64 intermediate kernel (2048 values) becomes 32x4 + 4x64 = 384 values.
    after = files["params"] - 2 * (2048 - 384)
    assert f"Total: {files['params']} -> {after} parameters" in out
    import tfcompress  # noqa: F401  (registers the custom layers)

    reloaded = keras.models.load_model(out_path, compile=False)
    assert reloaded.count_params() == after

    status, _, err = run_cli(capsys, "compress", files["paths"]["keras"], "--recipe", recipe,
                             "--out", out_path)
    assert status == 2
    assert "pass --overwrite" in err


def test_report_regenerates(capsys, files, tmp_path):
    """A job folder with evaluation.json and its models gets report.md and summary.json."""
    paths = files["paths"]
    out = tmp_path / "job"
    (out / "models").mkdir(parents=True)
    (out / "tflite").mkdir()
    shutil.copy(paths["keras"], out / "models" / "baseline.keras")
    shutil.copytree(paths["savedmodel"], out / "models" / "baseline_savedmodel")
    tflite = out / "tflite" / "baseline_float32.tflite"
    assert run_cli(capsys, "export", paths["keras"], "--mode", "float32", "--out", tflite,
                   "--calibration-data", paths["npz"])[0] == 0
    (out / "recipe.resolved.yaml").write_text(yaml.safe_dump({"quick": True}))
    row = {"accuracy": 0.5, "macro_f1": 0.4, "latency_median_ms": 1.0, "latency_p90_ms": 2.0}
    evaluation = {"examples": 16, "failed_exports": {}, "variants": {
        "baseline float32 SavedModel": dict(row, path="models/baseline_savedmodel", kind="keras"),
        "baseline float32": dict(row, path="tflite/baseline_float32.tflite", kind="tflite",
                                 mode="float32"),
    }}
    (out / "evaluation.json").write_text(json.dumps(evaluation))
    (out / "summary.json").write_text(json.dumps({"wall_seconds": 42}))

    status, printed, _ = run_cli(capsys, "report", out)
    assert status == 0
    assert "| baseline float32 | tflite float32 | " in printed
    report = json.loads((out / "report.json").read_text())
    for variant in report["variants"]:
        assert variant["path"].startswith(str(out))
    sizes = {v["name"]: v["bytes"] for v in report["variants"]}
    assert sizes["baseline float32"] == os.path.getsize(tflite)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_seconds"] == 42
    assert summary["quick"] is True
