"""Hyperparameters of a BERT encoder."""

import dataclasses
import json
import os


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Shape and numerics of a BERT encoder.

    Attributes:
      vocab_size: number of WordPiece tokens.
      hidden_size: width of the residual stream.
      num_layers: number of transformer blocks.
      num_heads: attention heads per block.
      intermediate_size: width of the feed-forward layer.
      max_position_embeddings: maximum sequence length the position table covers.
      type_vocab_size: number of segment (token type) ids.
      hidden_act: "gelu" (exact, erf based), "gelu_approximate" (tanh) or "relu".
      layer_norm_eps: epsilon of every LayerNormalization.
      dropout_rate: dropout after embeddings, attention output and FFN output.
      attention_dropout_rate: dropout on the attention probabilities.
      head_size: width of one attention head; hidden_size // num_heads by default.
      layer_heads: heads kept in each block, for encoders whose heads were pruned.
      layer_intermediate_sizes: FFN width of each block, for encoders whose neurons
        were pruned.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    head_size: int = 0
    layer_heads: tuple = ()
    layer_intermediate_sizes: tuple = ()

    def __post_init__(self):
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                      "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive integer; received {value!r}.")
        if self.hidden_act not in ("gelu", "gelu_approximate", "relu"):
            raise ValueError(
                "hidden_act must be 'gelu', 'gelu_approximate' or 'relu'; received "
                f"{self.hidden_act!r}."
            )
        if not self.head_size and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}; choose a head count that divides it or "
                "set head_size."
            )
        for field in ("dropout_rate", "attention_dropout_rate"):
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{field} must be in [0, 1); received {value!r}.")
        for field in ("layer_heads", "layer_intermediate_sizes"):
            value = tuple(getattr(self, field))
            object.__setattr__(self, field, value)
            if value and len(value) != self.num_layers:
                raise ValueError(
                    f"{field} must list one value per layer ({self.num_layers}); "
                    f"received {len(value)} values: {value!r}."
                )
            if any(not isinstance(v, int) or v < 1 for v in value):
                raise ValueError(f"{field} must hold positive integers; received {value!r}.")

    @property
    def attention_head_size(self):
        return self.head_size or self.hidden_size // self.num_heads

    def heads(self, layer):
        """Return the number of attention heads of block ``layer``."""
        return self.layer_heads[layer] if self.layer_heads else self.num_heads

    def intermediate(self, layer):
        """Return the FFN width of block ``layer``."""
        if self.layer_intermediate_sizes:
            return self.layer_intermediate_sizes[layer]
        return self.intermediate_size

    def to_dict(self):
        config = dataclasses.asdict(self)
        config["layer_heads"] = list(self.layer_heads)
        config["layer_intermediate_sizes"] = list(self.layer_intermediate_sizes)
        return config

    @classmethod
    def from_dict(cls, config):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown BertConfig fields {unknown}; known fields: {sorted(known)}.")
        return cls(**config)

    @classmethod
    def from_huggingface(cls, path):
        """Read a Hugging Face ``config.json`` of a ``BertModel``."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path!r}.")
        with open(path, encoding="utf-8") as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path!r} is not valid JSON: {error}.") from None
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                               "num_attention_heads", "intermediate_size") if k not in hf]
        if missing:
            raise ValueError(
                f"{path!r} is not a BERT config: keys {missing} are missing. Pass the "
                "config.json of a Hugging Face BertModel."
            )
        position_type = hf.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise NotImplementedError(
                f"position_embedding_type={position_type!r} in {path!r} is not supported; "
                "only 'absolute' position embeddings are."
            )
        act = {"gelu": "gelu", "gelu_new": "gelu_approximate",
               "gelu_pytorch_tanh": "gelu_approximate", "relu": "relu"}.get(hf.get("hidden_act", "gelu"))
        if act is None:
            raise NotImplementedError(
                f"hidden_act={hf.get('hidden_act')!r} in {path!r} is not supported; use "
                "gelu, gelu_new, gelu_pytorch_tanh or relu."
            )
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            hidden_act=act,
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            dropout_rate=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout_rate=hf.get("attention_probs_dropout_prob", 0.1),
        )
