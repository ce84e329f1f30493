"""Import of Hugging Face ``BertModel`` weights from ``config.json`` + ``model.safetensors``.

safetensors' numpy loader reads the weights, so PyTorch is not needed. Linear weights
are stored [out, in] by PyTorch and transposed into Keras [in, out] kernels.
"""

import os

import numpy as np

from tfcompress.bert.config import BertConfig
from tfcompress.bert.encoder import build_encoder


def _strip_prefix(weights):
    # Checkpoints saved from BertFor* task models prefix the encoder with "bert.".
    if any(k.startswith("bert.") for k in weights):
        return {k[len("bert."):]: v for k, v in weights.items() if k.startswith("bert.")}
    return weights


def _weight_map(config):
    """Map (Keras layer name, weight index) -> (HF tensor name, transpose)."""
    mapping = {
        ("embeddings/word_embeddings", 0): ("embeddings.word_embeddings.weight", False),
        ("embeddings/position_embeddings", 0): ("embeddings.position_embeddings.weight", False),
        ("embeddings/type_embeddings", 0): ("embeddings.token_type_embeddings.weight", False),
        ("embeddings/layer_norm", 0): ("embeddings.LayerNorm.weight", False),
        ("embeddings/layer_norm", 1): ("embeddings.LayerNorm.bias", False),
        ("pooler", 0): ("pooler.dense.weight", True),
        ("pooler", 1): ("pooler.dense.bias", False),
    }
    for i in range(config.num_layers):
        ours, theirs = f"transformer/layer_{i}", f"encoder.layer.{i}"
        pairs = {
            "attention/query": "attention.self.query",
            "attention/key": "attention.self.key",
            "attention/value": "attention.self.value",
            "attention/output": "attention.output.dense",
            "ffn/intermediate": "intermediate.dense",
            "ffn/output": "output.dense",
        }
        for our_name, their_name in pairs.items():
            mapping[(f"{ours}/{our_name}", 0)] = (f"{theirs}.{their_name}.weight", True)
            mapping[(f"{ours}/{our_name}", 1)] = (f"{theirs}.{their_name}.bias", False)
        for our_name, their_name in (("attention/layer_norm", "attention.output.LayerNorm"),
                                     ("ffn/layer_norm", "output.LayerNorm")):
            mapping[(f"{ours}/{our_name}", 0)] = (f"{theirs}.{their_name}.weight", False)
            mapping[(f"{ours}/{our_name}", 1)] = (f"{theirs}.{their_name}.bias", False)
    return mapping


def from_huggingface(folder, name="bert_encoder"):
    """Build an encoder from a Hugging Face ``BertModel`` folder.

    Args:
      folder: a folder with ``config.json`` and ``model.safetensors``.
      name: name of the returned Keras model.

    Returns:
      A tfcompress encoder holding the checkpoint's weights, pooler included.

    Raises:
      FileNotFoundError: the folder or one of the two files does not exist.
      ValueError: the config and the weights disagree (a missing tensor, or a shape that
        differs from the one the config implies).
    """
    from safetensors.numpy import load_file

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Hugging Face model folder not found: {folder!r}.")
    config_path = os.path.join(folder, "config.json")
    weights_path = os.path.join(folder, "model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{os.path.basename(path)} not found in {folder!r}; a Hugging Face BERT "
                "folder needs config.json and model.safetensors (save it with "
                "save_pretrained(..., safe_serialization=True))."
            )
    config = BertConfig.from_huggingface(config_path)
    weights = _strip_prefix(load_file(weights_path))

    # Check every tensor against the shape the config implies before building anything.
    encoder = build_encoder(config, name=name)
    layers = {layer.name: layer for layer in encoder.layers}
    assignments = []
    problems = []
    for (layer_name, index), (tensor_name, transpose) in _weight_map(config).items():
        if tensor_name not in weights:
            problems.append(f"{tensor_name} is missing")
            continue
        value = weights[tensor_name]
        if transpose:
            value = value.T
        variable = layers[layer_name].weights[index]
        if tuple(variable.shape) != value.shape:
            problems.append(
                f"{tensor_name} has shape {list(weights[tensor_name].shape)} but config.json "
                f"implies {list(variable.shape[::-1] if transpose else variable.shape)}"
            )
            continue
        assignments.append((variable, value))
    # Tensors of blocks the config does not describe (a config.json with fewer layers than
    # the checkpoint) would otherwise be dropped without a word.
    used = {tensor_name for tensor_name, _ in _weight_map(config).values()}
    extra = sorted(k for k in weights if k not in used and k.startswith("encoder.layer."))
    if extra:
        problems.append(f"{len(extra)} tensors such as {extra[0]} belong to layers that "
                        f"config.json (num_hidden_layers={config.num_layers}) does not have")
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(
            f"config.json and model.safetensors in {folder!r} disagree: {shown}{more}. "
            "Use the config.json that was saved with these weights."
        )
    for variable, value in assignments:
        variable.assign(np.asarray(value, dtype=np.float32))
    return encoder
