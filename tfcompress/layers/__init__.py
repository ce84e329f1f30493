"""Compressed Keras layers: low-rank, pruned, sparse and quantized Dense-like layers."""

from tfcompress.layers.base import (
    CompressedDense,
    CompressedEinsumDense,
    KernelLayer,
    KernelTransform,
    LowRankDense,
    LowRankEinsumDense,
    compressed_bytes,
    deserialize_transform,
    parameter_count,
    register_transform,
    serialize_transform,
    strip_layer,
)
from tfcompress.layers.lowrank import FactorizedEmbedding, low_rank, rank_for_energy, select_ranks
from tfcompress.layers.pruning import PruningMask, PruningStep, has_scheduled_pruning, prune
from tfcompress.layers.quantization import (
    ActivationQuantizer,
    BinaryWeights,
    FakeQuant,
    QuantizedAttentionCore,
    TernaryWeights,
    calibrate,
    quantize,
)
from tfcompress.layers.sparse import SparseDense, to_sparse
from tfcompress.layers.weight_only import WeightOnlyQuantDense, WeightOnlyQuantEmbedding

__all__ = [
    "ActivationQuantizer",
    "BinaryWeights",
    "CompressedDense",
    "CompressedEinsumDense",
    "FactorizedEmbedding",
    "FakeQuant",
    "KernelLayer",
    "KernelTransform",
    "LowRankDense",
    "LowRankEinsumDense",
    "PruningMask",
    "PruningStep",
    "QuantizedAttentionCore",
    "SparseDense",
    "TernaryWeights",
    "WeightOnlyQuantDense",
    "WeightOnlyQuantEmbedding",
    "calibrate",
    "compressed_bytes",
    "deserialize_transform",
    "has_scheduled_pruning",
    "low_rank",
    "parameter_count",
    "prune",
    "quantize",
    "rank_for_energy",
    "register_transform",
    "select_ranks",
    "serialize_transform",
    "strip_layer",
    "to_sparse",
]
