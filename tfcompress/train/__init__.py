"""Fine-tuning: precision policies, recomputation, distillation, resume, block-wise training."""

from tfcompress.train.blockwise import BlockwiseResult, train_blockwise
from tfcompress.train.blocks import Block, extract_blocks, replace_blocks
from tfcompress.train.distill import Distiller
from tfcompress.train.fine_tune import DivergenceGuard, fine_tune
from tfcompress.train.precision import PRECISIONS, policy_scope, rebuild
from tfcompress.train.recompute import RecomputeBlock, recompute_model
from tfcompress.train.schedule import WarmupLinearDecay

__all__ = [
    "Block", "BlockwiseResult", "Distiller", "DivergenceGuard", "PRECISIONS",
    "RecomputeBlock", "WarmupLinearDecay", "extract_blocks", "fine_tune", "policy_scope",
    "rebuild", "recompute_model", "replace_blocks", "train_blockwise",
]
