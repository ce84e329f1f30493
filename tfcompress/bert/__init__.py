"""BERT encoders: build, import (Hugging Face, TF-Hub, embedded MiniLM), export, classify."""

from tfcompress.bert.checks import check_vocab
from tfcompress.bert.config import BertConfig
from tfcompress.bert.encoder import INPUT_NAMES, build_encoder, classifier, encoder_config
from tfcompress.bert.hub import export_hub, from_hub
from tfcompress.bert.huggingface import from_huggingface
from tfcompress.bert.layers import AttentionCore, MaskedMeanPooling, PositionEmbedding
from tfcompress.bert.minilm import load_minilm, minilm_folder, minilm_vocab

__all__ = [
    "AttentionCore", "BertConfig", "check_vocab", "export_hub", "from_hub", "INPUT_NAMES", "MaskedMeanPooling", "PositionEmbedding",
    "build_encoder", "classifier", "encoder_config", "from_huggingface", "load_minilm",
    "minilm_folder", "minilm_vocab",
]
