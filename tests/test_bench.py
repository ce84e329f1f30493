"""Smoke tests of the benchmark harness: statistics, Markdown, one item end to end."""

import json
import os

import numpy as np
import pytest

from bench import common, markdown, stats


def test_summarize_hand_values():
    summary = stats.summarize([4.0, 1.0, 3.0, 2.0, 10.0])
    assert summary["median"] == 3.0
    assert summary["min"] == 1.0
    assert summary["max"] == 10.0
    assert summary["runs"] == 5
    # numpy's linear interpolation: position 0.9 * 4 = 3.6 between 4.0 and 10.0.
    assert summary["p90"] == pytest.approx(4.0 + 0.6 * 6.0)


def test_summarize_even_count_median():
    assert stats.summarize([1, 2, 3, 4])["median"] == 2.5


def test_summarize_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="at least one value"):
        stats.summarize([])
    with pytest.raises(ValueError, match="finite"):
        stats.summarize([1.0, float("nan")])


def test_time_calls_counts_calls():
    calls = []
    summary = stats.time_calls(lambda: calls.append(1), runs=4, warmup=2)
    assert len(calls) == 6
    assert summary["runs"] == 4
    assert summary["min"] <= summary["median"] <= summary["max"]


def test_ratio_of_figures():
    assert stats.ratio({"median": 6.0}, {"median": 2.0}) == 3.0
    assert stats.ratio(6.0, 0) is None


def test_format_value_cases():
    assert markdown.format_value({"median": 1.5, "min": 1.25, "max": 2.0}) == "1.5 [1.25, 2]"
    assert markdown.format_value(1234567) == "1,234,567"
    assert markdown.format_value(0.0001234) == "1.23e-04"
    assert markdown.format_value(None) == ""
    assert markdown.format_value(True) == "yes"
    assert markdown.format_value("a|b") == "a\\|b"


def test_render_table_exact():
    text = markdown.render_table([["a", "A"], ["b", "B"]], [{"a": 1, "b": "x"}, {"a": 2}])
    assert text == "| A | B |\n|---|---|\n| 1 | x |\n| 2 |  |"


def test_render_shows_status_and_machine():
    results = {
        "command": "python -m bench.run",
        "machine": {"date": "2026-01-02 03:04 UTC", "cpu": "Test CPU", "cores": 2,
                    "memory_bytes": 4 * 2**30, "tensorflow": "2.21.0"},
        "items": {
            "one": {"title": "First", "status": "ok", "columns": [["x", "X"]],
                    "rows": [{"x": 3}], "notes": ["a note"], "seconds": 2.0},
            "two": {"title": "Second", "status": "not run: no job folder"},
        },
    }
    text = markdown.render(results)
    assert "| CPU (/proc/cpuinfo) | Test CPU |" in text
    assert "| memory | 4.0 GiB |" in text
    assert "## 1. First" in text
    assert "| X |\n|---|\n| 3 |" in text
    assert "- a note" in text
    assert "## 2. Second\n\n**not run: no job folder**" in text
    assert "Smoke run" not in text


def test_short_error_adds_keras_cause():
    error = TypeError("Exception encountered when calling layer 'x'.\n\nbad input\nmore")
    assert common.short_error(error) == (
        "TypeError: Exception encountered when calling layer 'x'. bad input")
    traced = TypeError("Exception encountered when calling layer 'q'.\nin user code:\n"
                       "  File x.py\nTypeError: expected int32\n\nCall arguments:\n"
                       "  • training=None")
    assert common.short_error(traced) == (
        "TypeError: Exception encountered when calling layer 'q'. TypeError: expected int32")
    assert len(common.short_error(ValueError("y" * 500))) == 200


def test_pruned_kernel_zero_count():
    from bench.sparse_matmul import pruned_kernel

    kernel = pruned_kernel((8, 10), 0.7)
    dense = pruned_kernel((8, 10), 0.0)
    assert int(np.sum(kernel == 0)) == 56
    assert int(np.sum(dense == 0)) == 0
    # The 24 kept entries are the largest in magnitude, unchanged.
    kept = kernel != 0
    np.testing.assert_array_equal(kernel[kept], dense[kept])
    assert np.min(np.abs(dense[kept])) >= np.max(np.abs(dense[~kept]))


def test_sparse_matmul_item_end_to_end(tmp_path):
    from bench import run

    out = str(tmp_path / "out")
    assert run.main(["--smoke", "--only", "sparse_matmul", "--out", out]) == 0
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    item = results["items"]["sparse_matmul"]
    assert item["status"] == "ok"
    # Two row counts (4 and 16 in smoke size) times five sparsities.
    assert len(item["rows"]) == 10
    assert [r["sparsity"] for r in item["rows"][:5]] == [0.5, 0.7, 0.8, 0.9, 0.95]
    for row in item["rows"]:
        assert row["matmul_ms"]["runs"] == 3
        assert row["sparse_speedup"] == pytest.approx(
            row["matmul_ms"]["median"] / row["sparse_ms"]["median"])
    assert results["smoke"] is True
    assert results["machine"]["cores"] >= 1
    with open(os.path.join(out, "BENCHMARKS.md"), encoding="utf-8") as f:
        text = f.read()
    assert "## 1. Sparse against dense matmul on this CPU" in text
    assert "Smoke run" in text


def test_job_for_missing_folder(tmp_path):
    missing = str(tmp_path / "no_job")
    settings = common.Settings(smoke=False, out=str(tmp_path), job_dir=missing)
    with pytest.raises(common.NotRun, match="does not exist") as raised:
        common.job_for(settings)
    assert missing in str(raised.value)
    assert "tfcompress run data/recipes/minilm_tweets.yaml" in str(raised.value)


def test_load_recipe_scales_smoke_ranks():
    full = common.load_recipe("lowrank_int8", smoke=False)
    smoke = common.load_recipe("lowrank_int8", smoke=True)
    assert [r.low_rank["rank"] for r in full.rules if r.low_rank] == [64, 128]
    assert [r.low_rank["rank"] for r in smoke.rules if r.low_rank] == [8, 16]
