"""Configuration of the Llama baseline: a frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
import math

from megalodon_flax.config_base import ConfigError, MappingConfig
from megalodon_flax.layers.remat import REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class LlamaConfig(MappingConfig):
    """Hyper-parameters of the Llama baseline (pre-norm RMSNorm, RoPE, SwiGLU, tied head).

    The enwik8 defaults (dim 384, 6 layers, 6 heads of 64, FFN hidden 1280) give
    12,489,600 parameters (`llama.param_count.parameter_breakdown`); the reference
    comparison reports 12,489,792 for its Llama.

    Attributes:
      vocab_size: embedding rows, also the width of the tied LM head.
      model_dim: residual width D.
      num_layers: transformer blocks.
      num_heads: attention heads; the head width is model_dim / num_heads.
      ffn_hidden_dim: SwiGLU hidden width F.
      rope_base: RoPE base.
      norm_eps: epsilon of the RMSNorms.
      dropout: dropout on the embeddings and on each sub-block's output.
      attention_dropout: dropout on the attention probabilities.
      init_std: standard deviation of the normal weight initialization.
      param_dtype: storage dtype of the parameters.
      compute_dtype: dtype of matmul inputs and activations (norms, softmax and logits stay
        float32).
      remat_policy: what the backward pass keeps of each block (`layers.remat`): "none",
        "full", "save_dots" or "save_dots_no_batch".
    """

    vocab_size: int = 256
    model_dim: int = 384
    num_layers: int = 6
    num_heads: int = 6
    ffn_hidden_dim: int = 1280
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat_policy: str = "none"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "model_dim", "num_layers", "num_heads", "ffn_hidden_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if self.model_dim % self.num_heads:
            raise ConfigError(
                f"model_dim ({self.model_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"head width model_dim/num_heads = {self.head_dim} must be even (RoPE pairs)"
            )
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= float(value) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        for name in ("rope_base", "norm_eps", "init_std"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be positive and finite, got {value}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(
                f"remat_policy must be one of {tuple(REMAT_POLICIES)}, got {self.remat_policy!r}"
            )
        self._check_dtypes("it follows the Megalodon runs' dtype rules")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def output_width(self) -> int:
        """LM-head width (the tied embedding's rows)."""
        return self.vocab_size
