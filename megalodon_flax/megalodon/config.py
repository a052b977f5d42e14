"""Megalodon's model configuration: a frozen, validated dataclass with the spec §1 fields.

Every invalid value fails at construction with a message naming the field and the rule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from megalodon_flax.config_base import ConfigError, MappingConfig
from megalodon_flax.layers.remat import REMAT_POLICIES

_INIT_MODES = ("he", "bert", "gaussian", "xavier")
_CEMA_PATHS = ("fft", "scan", "sequential")
ATTENTION_IMPLS = ("auto", "xla", "dot_product")


@dataclasses.dataclass(frozen=True)
class MegalodonConfig(MappingConfig):
    """Hyper-parameters of the Megalodon causal LM (names follow megalodon-hf).

    Attributes beyond the HF fields:
      bias_topology: "hf" (bias on all 8 internal linears) or "upstream" (none on wh2, fc1-3).
      tie_policy: "hf" (tie the head iff output width == vocab) or "explicit" (iff share_emb).
      timestep_norm_variant: "upstream" (block Welford) or "hf" (megalodon-hf's formula).
      rope_layout: "adjacent" (pairs (2j, 2j+1)) or "half_split" (pairs (j, j + Dh/2)).
      cema_path: CEMA algorithm for uncached calls: "fft", "scan" (associative) or
        "sequential" (lax.scan recurrence).
      sequential_cema_below: cached calls shorter than this use the sequential recurrence;
        longer ones use the FFT path with the initial-state bias and closed-form state.
      cema_block_size: lags per block when building CEMA powers. With factored powers a
        block of K lags needs only D·N·2√K temporaries, so the default keeps calls up to 1M
        tokens in one block (each extra block adds its ops to the compiled program).
      param_dtype: storage dtype of ordinary parameters (the sensitive set stays float32).
      compute_dtype: dtype of matmul inputs and activations; CEMA, TimestepNorm, norms,
        softmax and logits always compute in float32.
      remat_policy: what the backward pass keeps of each block's forward pass
        (`layers.remat.REMAT_POLICIES`): "none", "full" (recompute the block),
        "save_dots" or "save_dots_no_batch" (keep matmul outputs), or
        "save_dots_spectra_probs" (also CEMA's FFT spectra and the attention
        probabilities).
      scan_layers: run the blocks under `nn.scan` over parameters stacked on a leading
        "layers" axis (one traced block: compile time flat in depth, less memory). The
        parameter tree and cache differ by layout; `megalodon.layer_stack` converts between
        them. Scanned blocks want a remat policy (without one the loop stacks every
        layer's residuals): the training default (`training.config`) is scanned with
        "save_dots_no_batch" (benchmarks/RESULTS.md, "Execution options").
      attention_impl: chunk-local attention kernel: "xla" (the masked softmax of
        `layers.attention`), "dot_product" (`jax.nn.dot_product_attention` with chunks
        folded into the batch: cuDNN's fused attention on NVIDIA GPUs in bfloat16, XLA
        elsewhere) or "auto" (the faster one measured: xla on CPU and on an H200).
      mask_cema_inputs: zero masked inputs before the CEMA recurrence (megalodon-hf feeds
        padded positions through it: False).
      embedding_dropout: apply `dropout` to the embeddings (megalodon-hf does not: False).
    """

    # Vocabulary size V (embedding rows).
    vocab_size: int = 32000
    # Model width D.
    model_dim: int = 1024
    # Number of Megalodon blocks.
    num_layers: int = 12
    # Attention heads (they share the Q/K width z_dim and the value width value_dim).
    num_heads: int = 1
    # Shared Q/K width Z.
    z_dim: int = 256
    # Value / gate width E.
    value_dim: int = 2048
    # FFN hidden width F.
    ffn_hidden_dim: int = 2560
    # CEMA order N (complex EMA dimensions per channel).
    cema_ndim: int = 16
    # Attention chunk length C.
    chunk_size: int = 2048
    # Groups of TimestepNorm.
    norm_num_groups: int = 32
    # Dropout on the embedding and block outputs.
    dropout: float = 0.0
    # Dropout on the attention probabilities.
    attention_dropout: float = 0.0
    # Dropout inside the blocks (CEMA output, gated attention, FFN hidden).
    hidden_dropout: float = 0.0
    # SwiGLU FFN (adds fc3).
    swiglu: bool = False
    # Rescale the FFN output per layer.
    rescale_nffn: bool = False
    # Multiply embeddings by sqrt(D).
    scale_emb: bool = False
    # Tie the LM head to the embedding (with tie_policy 'explicit').
    share_emb: bool = False
    # Learnable scales and offsets in the norms.
    norm_affine: bool = True
    # Epsilon of all norms.
    norm_eps: float = 1e-5
    # Weight initialization: he, bert, gaussian or xavier.
    init_mode: str = "he"
    # RoPE base (None: 10000).
    rope_base: float | None = None
    # LM-head width (-1: vocab_size).
    output_size: int = -1
    # Padding token id.
    pad_token_id: int = 0
    # Beginning-of-sequence token id.
    bos_token_id: int = 1
    # End-of-sequence token id.
    eos_token_id: int = 2
    bias_topology: str = "hf"
    tie_policy: str = "hf"
    timestep_norm_variant: str = "upstream"
    rope_layout: str = "adjacent"
    cema_path: str = "fft"
    sequential_cema_below: int = 32
    cema_block_size: int = 1 << 20
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = False
    attention_impl: str = "auto"
    mask_cema_inputs: bool = True
    embedding_dropout: bool = True

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        positive = (
            "vocab_size",
            "model_dim",
            "num_layers",
            "num_heads",
            "z_dim",
            "value_dim",
            "ffn_hidden_dim",
            "cema_ndim",
            "chunk_size",
            "norm_num_groups",
            "sequential_cema_below",
            "cema_block_size",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an int, got {value!r}")
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.z_dim % self.num_heads:
            raise ConfigError(
                f"z_dim ({self.z_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.value_dim % self.num_heads:
            raise ConfigError(
                f"value_dim ({self.value_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if (self.z_dim // self.num_heads) % 2:
            raise ConfigError(
                f"head width z_dim/num_heads = {self.z_dim // self.num_heads} must be even "
                "(RoPE rotates pairs)"
            )
        if self.model_dim % self.norm_num_groups:
            raise ConfigError(
                f"model_dim ({self.model_dim}) must be divisible by norm_num_groups "
                f"({self.norm_num_groups})"
            )
        for name in ("dropout", "attention_dropout", "hidden_dropout"):
            value = getattr(self, name)
            if not (0.0 <= float(value) < 1.0):
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        if not (math.isfinite(self.norm_eps) and self.norm_eps > 0):
            raise ConfigError(f"norm_eps must be positive and finite, got {self.norm_eps}")
        if self.rope_base is not None and not (
            math.isfinite(self.rope_base) and self.rope_base > 0
        ):
            raise ConfigError(f"rope_base must be positive if given, got {self.rope_base}")
        if self.output_size != -1 and self.output_size <= 0:
            raise ConfigError(f"output_size must be -1 or positive, got {self.output_size}")
        for name, allowed in (
            ("init_mode", _INIT_MODES),
            ("bias_topology", ("hf", "upstream")),
            ("tie_policy", ("hf", "explicit")),
            ("timestep_norm_variant", ("upstream", "hf")),
            ("rope_layout", ("adjacent", "half_split")),
            ("cema_path", _CEMA_PATHS),
            ("remat_policy", tuple(REMAT_POLICIES)),
            ("attention_impl", ATTENTION_IMPLS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        self._check_dtypes(
            "CEMA powers, FFT sums, TimestepNorm moments and unscaled attention logits "
            "exceed float16 range/precision"
        )
        if self.share_emb and self.output_width != self.vocab_size:
            raise ConfigError(
                f"share_emb requires output_size == vocab_size, got {self.output_width} != "
                f"{self.vocab_size}"
            )

    # ------------------------------------------------------------------ derived values
    @property
    def head_dim(self) -> int:
        """Per-head Q/K width Dh = z_dim / num_heads."""
        return self.z_dim // self.num_heads

    @property
    def value_head_dim(self) -> int:
        """Per-head value width Dv = value_dim / num_heads."""
        return self.value_dim // self.num_heads

    @property
    def output_width(self) -> int:
        """LM-head width V_out."""
        return self.vocab_size if self.output_size == -1 else self.output_size

    @property
    def tied(self) -> bool:
        """Whether the LM head reuses the input embedding."""
        if self.tie_policy == "hf":
            return self.output_width == self.vocab_size
        return self.share_emb

    @property
    def effective_rope_base(self) -> float:
        return 10000.0 if self.rope_base is None else float(self.rope_base)

    def linear_has_bias(self, name: str) -> bool:
        """Whether the internal linear layer `name` (wz, wv, ..., fc3) carries a bias."""
        if self.bias_topology == "hf":
            return True
        return name in ("wz", "wv", "wr", "wh1")


def hf_compatible(config: MegalodonConfig) -> MegalodonConfig:
    """The megalodon-hf behaviour (spec §9.6) on top of `config`'s sizes.

    HF TimestepNorm statistics (between-timestep variance, prior-variance term, 1e-6 floor,
    padded outputs not zeroed), CEMA fed the padded positions, no embedding dropout. Layout
    differences (biases, head tying, half-split RoPE, direct LayerNorm scale) are handled by
    the checkpoint conversion, not here.
    """
    return config.replace(
        timestep_norm_variant="hf", mask_cema_inputs=False, embedding_dropout=False
    )


def enwik8_config(**overrides: Any) -> MegalodonConfig:
    """The enwik8 reference configuration (11,277,696 parameters in the default topology)."""
    base = dict(
        vocab_size=256,
        model_dim=384,
        num_layers=6,
        num_heads=3,
        z_dim=192,
        value_dim=384,
        ffn_hidden_dim=1024,
        cema_ndim=8,
        chunk_size=256,
        norm_num_groups=32,
        swiglu=True,
    )
    base.update(overrides)
    return MegalodonConfig(**base)
