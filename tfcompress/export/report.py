"""Size / accuracy / latency table over model variants, as Markdown, JSON and a plot.

Every size is measured from the bytes on disk. A SavedModel folder's size is the sum
of its file sizes, and its gzip size is that of an uncompressed tar of the folder
(files in sorted order, times zeroed) compressed with gzip level 6.
"""

import dataclasses
import io
import json
import os
import tarfile

import numpy as np

from tfcompress.export.flatbuffer import gzip_size, weight_stats

SLOWER = "slower than float32"
NO_REDUCTION = "no size reduction"


def measure_path(path):
    """Return ``(bytes, gzip_bytes)`` of a file or a folder (see the module docstring)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            content = f.read()
        return len(content), gzip_size(content)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path not found: {path!r}.")
    total = 0
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for folder, subfolders, files in os.walk(path):
            subfolders.sort()
            for name in sorted(files):
                full = os.path.join(folder, name)
                total += os.path.getsize(full)
                info = tar.gettarinfo(full, arcname=os.path.relpath(full, path))
                info.mtime = 0
                with open(full, "rb") as f:
                    tar.addfile(info, f)
    return total, gzip_size(archive.getvalue())


def keras_nonzero_fraction(model):
    """Return the fraction of nonzero values in a Keras model's weights of rank >= 2."""
    total = nonzero = 0
    for weight in model.weights:
        if len(weight.shape) >= 2:
            values = np.asarray(weight)
            total += values.size
            nonzero += int(np.count_nonzero(values))
    return nonzero / total if total else 1.0


@dataclasses.dataclass
class Variant:
    """One model in the report.

    Attributes:
      name: row label.
      kind: "keras" (a SavedModel folder or .keras file) or "tflite".
      path: where the model is stored.
      bytes: size on disk.
      gzip_bytes: gzip-compressed size (see the module docstring for folders).
      nonzero_fraction: measured fraction of nonzero weights (rank >= 2).
      mode: the TFLite mode ("float32", "int8"...); None for Keras models.
      accuracy, macro_f1: on the evaluation split, or None.
      latency_median_ms, latency_p90_ms: batch-1 latency, or None.
    """

    name: str
    kind: str
    path: str
    bytes: int
    gzip_bytes: int
    nonzero_fraction: float = None
    mode: str = None
    accuracy: float = None
    macro_f1: float = None
    latency_median_ms: float = None
    latency_p90_ms: float = None

    def __post_init__(self):
        if self.kind not in ("keras", "tflite"):
            raise ValueError(f"kind must be 'keras' or 'tflite'; received {self.kind!r}.")

    @classmethod
    def measure(cls, name, path, kind=None, mode=None, model=None, evaluation=None,
                latency=None):
        """Build a variant from a model on disk, measuring its bytes and nonzero fraction.

        Args:
          name: row label.
          path: a .tflite file, a SavedModel folder or a .keras file.
          kind: "keras" or "tflite"; taken from the path when None.
          mode: the TFLite mode of a .tflite file.
          model: the Keras model stored at ``path``, to measure its nonzero fraction.
          evaluation: an ``Evaluation`` (accuracy, macro F1), or None.
          latency: a ``Latency``, or None.
        """
        path = os.fspath(path)
        kind = kind or ("tflite" if path.endswith(".tflite") else "keras")
        size, gzipped = measure_path(path)
        if kind == "tflite":
            with open(path, "rb") as f:
                nonzero = 1.0 - weight_stats(f.read()).sparsity
        else:
            nonzero = keras_nonzero_fraction(model) if model is not None else None
        return cls(name=name, kind=kind, path=path, bytes=size, gzip_bytes=gzipped,
                   nonzero_fraction=nonzero, mode=mode,
                   accuracy=getattr(evaluation, "accuracy", None),
                   macro_f1=getattr(evaluation, "macro_f1", None),
                   latency_median_ms=getattr(latency, "median_ms", None),
                   latency_p90_ms=getattr(latency, "p90_ms", None))

    @classmethod
    def from_export(cls, name, result, evaluation=None, latency=None):
        """Build a variant from a ``to_tflite`` result."""
        return cls(name=name, kind="tflite", path=result.path, bytes=result.bytes,
                   gzip_bytes=result.gzip_bytes, nonzero_fraction=1.0 - result.sparsity,
                   mode=result.mode,
                   accuracy=getattr(evaluation, "accuracy", None),
                   macro_f1=getattr(evaluation, "macro_f1", None),
                   latency_median_ms=getattr(latency, "median_ms", None),
                   latency_p90_ms=getattr(latency, "p90_ms", None))


class SizeReport:
    """Variants compared with the float32 SavedModel and the float32 TFLite model.

    Args:
      variants: ``Variant`` objects, in row order.
      keras_baseline: name of the float32 Keras variant; defaults to the first Keras
        variant.
      tflite_baseline: name of the float32 TFLite variant; defaults to the first
        TFLite variant of mode "float32".
    """

    def __init__(self, variants, keras_baseline=None, tflite_baseline=None):
        self.variants = list(variants)
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique; received {names}.")
        self.keras_baseline = self._baseline(keras_baseline, "keras", None)
        self.tflite_baseline = self._baseline(tflite_baseline, "tflite", "float32")

    def _baseline(self, name, kind, mode):
        if name is not None:
            for variant in self.variants:
                if variant.name == name:
                    return variant
            raise ValueError(f"baseline {name!r} is not a variant; variants are "
                             f"{[v.name for v in self.variants]}.")
        for variant in self.variants:
            if variant.kind == kind and (mode is None or variant.mode == mode):
                return variant
        return None

    def rows(self):
        """Return one dict per variant with the measured values, ratios and flags."""
        rows = []
        float32_latency = getattr(self.tflite_baseline, "latency_median_ms", None)
        for variant in self.variants:
            row = dataclasses.asdict(variant)
            row["ratio_to_keras_float32"] = (
                variant.bytes / self.keras_baseline.bytes if self.keras_baseline else None)
            row["ratio_to_tflite_float32"] = (
                variant.bytes / self.tflite_baseline.bytes if self.tflite_baseline else None)
            flags = []
            # Quantized kernels can be slower than float ones on a CPU, so every TFLite
            # variant is compared with the float32 TFLite model. For example, MiniLM in
            # int16x8 ran about 30 times slower than float32 under LiteRT 2.3.0.
            if (variant.kind == "tflite" and variant is not self.tflite_baseline
                    and float32_latency is not None
                    and variant.latency_median_ms is not None
                    and variant.latency_median_ms > float32_latency):
                flags.append(SLOWER)
            # Each variant is compared with the float32 model of its own kind.
            baseline = self.tflite_baseline if variant.kind == "tflite" else self.keras_baseline
            if baseline is not None and variant is not baseline and variant.bytes >= baseline.bytes:
                flags.append(NO_REDUCTION)
            row["flags"] = flags
            rows.append(row)
        return rows

    def to_json(self):
        return json.dumps({"variants": self.rows(),
                           "keras_baseline": getattr(self.keras_baseline, "name", None),
                           "tflite_baseline": getattr(self.tflite_baseline, "name", None),
                           "folder_gzip": "gzip level 6 of an uncompressed tar"},
                          indent=2)

    def to_markdown(self):
        header = ["variant", "kind", "bytes", "gzip bytes", "x keras f32", "x tflite f32",
                  "nonzero", "accuracy", "macro F1", "latency median ms", "latency p90 ms",
                  "flags"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows():
            kind = row["kind"] if row["mode"] is None else f"{row['kind']} {row['mode']}"
            cells = [row["name"], kind, str(row["bytes"]), str(row["gzip_bytes"]),
                     _format(row["ratio_to_keras_float32"], "{:.3f}"),
                     _format(row["ratio_to_tflite_float32"], "{:.3f}"),
                     _format(row["nonzero_fraction"], "{:.4f}"),
                     _format(row["accuracy"], "{:.4f}"), _format(row["macro_f1"], "{:.4f}"),
                     _format(row["latency_median_ms"], "{:.3f}"),
                     _format(row["latency_p90_ms"], "{:.3f}"), ", ".join(row["flags"])]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, path):
        """Write a PNG of size against accuracy, coloured by median latency."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot

        rows = [r for r in self.rows() if r["accuracy"] is not None]
        figure, axes = pyplot.subplots(figsize=(6, 4))
        if rows:
            latencies = [r["latency_median_ms"] if r["latency_median_ms"] is not None
                         else np.nan for r in rows]
            points = axes.scatter([r["bytes"] / 2**20 for r in rows],
                                  [r["accuracy"] for r in rows], c=latencies,
                                  cmap="viridis", plotnonfinite=True)
            figure.colorbar(points, label="median latency (ms)")
            for r in rows:
                axes.annotate(r["name"], (r["bytes"] / 2**20, r["accuracy"]), fontsize=7)
        axes.set_xlabel("size on disk (MiB)")
        axes.set_ylabel("accuracy")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        pyplot.close(figure)

    def save(self, folder, name="report"):
        """Write ``name``.md, ``name``.json and ``name``.png to ``folder``; return their paths."""
        os.makedirs(folder, exist_ok=True)
        paths = {ext: os.path.join(folder, f"{name}.{ext}") for ext in ("md", "json", "png")}
        with open(paths["md"], "w", encoding="utf-8") as f:
            f.write(self.to_markdown())
        with open(paths["json"], "w", encoding="utf-8") as f:
            f.write(self.to_json())
        self.plot(paths["png"])
        return paths


def _format(value, pattern):
    return "" if value is None else pattern.format(value)
