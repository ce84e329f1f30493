"""TFLite export with verification, and the size / accuracy / latency report."""

from tfcompress.export.flatbuffer import (UnsupportedOpError, WeightStats, check_builtin_ops,
                                          gzip_size, operator_names, weight_stats)
from tfcompress.export.report import SizeReport, Variant, measure_path
from tfcompress.export.tflite import (MODES, TOLERANCES, ExportResult, Tolerance, Verification,
                                      VerificationError, to_tflite)

__all__ = [
    "MODES", "TOLERANCES", "ExportResult", "SizeReport", "Variant", "measure_path", "Tolerance", "UnsupportedOpError", "Verification",
    "VerificationError", "WeightStats", "check_builtin_ops", "gzip_size", "operator_names",
    "to_tflite", "weight_stats",
]
