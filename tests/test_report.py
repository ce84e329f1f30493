"""Size report: measured bytes, ratios, flags, Markdown / JSON / PNG output."""

import json
import os

import numpy as np
import pytest

from tfcompress._keras import keras
from tfcompress.export import SizeReport, Variant, measure_path, to_tflite
from tfcompress.export.report import NO_REDUCTION, SLOWER


def _variant(name, kind, size, mode=None, median=None):
    return Variant(name=name, kind=kind, path=f"/models/{name}", bytes=size,
                   gzip_bytes=size // 2, mode=mode, latency_median_ms=median,
                   latency_p90_ms=None if median is None else median * 1.2)


def test_quantized_slower_flagged():
    report = SizeReport([
        _variant("keras", "keras", 4000),
        _variant("f32", "tflite", 1000, "float32", median=2.0),
        _variant("int8", "tflite", 300, "int8", median=2.5),
        _variant("dynamic", "tflite", 320, "dynamic", median=3.0),
        _variant("int16x8", "tflite", 400, "int16x8", median=60.0),
        _variant("int4", "tflite", 150, "int4", median=1.5),
    ])
    rows = {row["name"]: row for row in report.rows()}
    assert rows["int8"]["flags"] == [SLOWER]
    assert rows["dynamic"]["flags"] == [SLOWER]
    assert rows["int16x8"]["flags"] == [SLOWER]
    assert rows["int4"]["flags"] == []
    assert rows["f32"]["flags"] == []
    assert rows["int8"]["ratio_to_tflite_float32"] == pytest.approx(0.3)
    assert rows["int8"]["ratio_to_keras_float32"] == pytest.approx(0.075)


def test_int8_faster_not_flagged():
    report = SizeReport([_variant("f32", "tflite", 1000, "float32", median=2.0),
                         _variant("int8", "tflite", 300, "int8", median=1.0)])
    assert report.rows()[1]["flags"] == []


def test_tiny_model_no_size_reduction(tmp_path):
    inputs = keras.Input((1,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    saved = tmp_path / "saved"
    model.save(saved)
    data = np.linspace(-1, 1, 4, dtype=np.float32)[:, None]
    float32 = to_tflite(model, tmp_path / "f32.tflite", verify_data=data)
    dynamic = to_tflite(model, tmp_path / "dyn.tflite", mode="dynamic", verify_data=data)
    report = SizeReport([
        Variant.measure("savedmodel", saved, model=model),
        Variant.from_export("float32", float32),
        Variant.from_export("dynamic", dynamic),
    ])
    rows = {row["name"]: row for row in report.rows()}
    # 49 parameters: the quantization scales and ops cost more than the saved bytes.
    assert rows["dynamic"]["ratio_to_tflite_float32"] == dynamic.bytes / float32.bytes
    assert rows["dynamic"]["ratio_to_tflite_float32"] >= 1.0
    assert NO_REDUCTION in rows["dynamic"]["flags"]
    assert rows["float32"]["flags"] == []
    expected = sum(os.path.getsize(os.path.join(folder, name))
                   for folder, _, names in os.walk(saved) for name in names)
    assert rows["savedmodel"]["bytes"] == expected
    assert rows["savedmodel"]["ratio_to_keras_float32"] == 1.0

    paths = report.save(tmp_path / "report")
    with open(paths["json"], encoding="utf-8") as f:
        loaded = json.load(f)
    assert [v["name"] for v in loaded["variants"]] == ["savedmodel", "float32", "dynamic"]
    with open(paths["md"], encoding="utf-8") as f:
        markdown = f.read()
    assert markdown.count("\n") == 5  # header, rule, three rows
    assert NO_REDUCTION in markdown
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_pruned_variants_reported(tmp_path):
    inputs = keras.Input((512,))
    layer = keras.layers.Dense(512, name="dense")
    model = keras.Model(inputs, layer(inputs))
    data = np.random.default_rng(0).normal(size=(2, 512)).astype(np.float32)
    dense = to_tflite(model, tmp_path / "dense.tflite", verify_data=data)
    kernel, bias = layer.get_weights()
    kernel[np.abs(kernel) <= np.quantile(np.abs(kernel), 0.8)] = 0.0
    layer.set_weights([kernel, bias])
    pruned = to_tflite(model, tmp_path / "pruned.tflite", verify_data=data)
    encoded = to_tflite(model, tmp_path / "sparse.tflite", verify_data=data, sparse=True)
    report = SizeReport([Variant.from_export("dense", dense),
                         Variant.from_export("pruned", pruned),
                         Variant.measure("sparse", tmp_path / "sparse.tflite", mode="float32")],
                        tflite_baseline="dense")
    rows = {row["name"]: row for row in report.rows()}
    assert rows["pruned"]["nonzero_fraction"] == pytest.approx(0.2, abs=1e-3)
    assert rows["sparse"]["nonzero_fraction"] == pytest.approx(0.2, abs=1e-3)
    assert rows["pruned"]["gzip_bytes"] <= 0.45 * rows["dense"]["gzip_bytes"]
    assert rows["sparse"]["ratio_to_tflite_float32"] < 1.0
    assert rows["sparse"]["bytes"] == encoded.bytes


def test_measure_path_missing():
    with pytest.raises(FileNotFoundError, match="nowhere"):
        measure_path("/nowhere/model.tflite")
