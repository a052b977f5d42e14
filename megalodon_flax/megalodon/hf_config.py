"""megalodon-hf's `config.json` ↔ `MegalodonConfig` (spec §1.1).

`to_hf_config` writes the dictionary that megalodon-hf's `MegalodonConfig.from_pretrained`
reads: its own field names (`src/megalodon/configuration_megalodon.py`), its `model_type`
and `architectures`, and the standard `transformers` keys it relies on (`torch_dtype`,
`tie_word_embeddings`, and the decoder flags it sets itself). `from_hf_config` reads such a
file back; `model_differences` lists where two configs describe different models.

Fields of ours that megalodon-hf lacks (`bias_topology`, `rope_layout`, ...) are layout or
execution choices that the weight conversion absorbs (spec §8); megalodon-hf fields we lack
(`max_cache_len`, `cache_unbounded`, `efficient_attn`, `max_positions`) are written with the
values that reproduce our behaviour (chunk-local KV cache of `chunk_size` keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from absl import logging

from megalodon_flax.config_base import ConfigError
from megalodon_flax.megalodon.config import MegalodonConfig

MODEL_TYPE = "megalodon"
ARCHITECTURE = "MegalodonForCausalLM"
# megalodon-hf's MegalodonConfig.__init__ arguments that are MegalodonConfig fields here too.
SHARED_FIELDS = (
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
    "dropout",
    "attention_dropout",
    "hidden_dropout",
    "swiglu",
    "rescale_nffn",
    "scale_emb",
    "share_emb",
    "norm_affine",
    "norm_eps",
    "init_mode",
    "rope_base",
    "output_size",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
# megalodon-hf fields with no counterpart here, and the values our model behaves like.
HF_ONLY_DEFAULTS: dict[str, Any] = {
    "cache_unbounded": False,
    "efficient_attn": None,
    "max_positions": 1_000_000,
}
# What decides the function a model computes and the shapes of its weights: two configs that
# agree on these (and on `effective_rope_base`, `output_width`, `tied`) load the same weights
# into the same model; dropouts, token ids and init only matter for training or generation.
MODEL_FIELDS = (
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
    "swiglu",
    "rescale_nffn",
    "scale_emb",
    "norm_affine",
    "norm_eps",
    "effective_rope_base",
    "output_width",
    "tied",
)


def to_hf_config(config: MegalodonConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The megalodon-hf `config.json` of `config` (weights exported as `torch_dtype`).

    Raises:
        ConfigError: A `pad_token_id` outside the vocabulary (megalodon-hf could not build
            the model).
    """
    if torch_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"torch_dtype must be 'float32' or 'bfloat16', got {torch_dtype!r}")
    if not -config.vocab_size <= config.pad_token_id < config.vocab_size:
        raise ConfigError(
            f"pad_token_id={config.pad_token_id} is outside the vocabulary of "
            f"{config.vocab_size}: megalodon-hf makes it the embedding's padding_idx, which "
            "torch.nn.Embedding refuses"
        )
    out: dict[str, Any] = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE}
    out.update({name: getattr(config, name) for name in SHARED_FIELDS})
    out.update(HF_ONLY_DEFAULTS)
    out.update(
        num_attention_heads=config.num_heads,
        max_cache_len=config.chunk_size,
        gradient_checkpointing=config.remat_policy != "none",
        is_decoder=True,
        use_cache=True,
        # transformers ties lm_head to the embedding unless this is false; megalodon-hf
        # ties by width itself, so an untied (wider or narrower) head must say so here.
        tie_word_embeddings=config.tied,
        torch_dtype=torch_dtype,
    )
    return out


def from_hf_config(values: Mapping[str, Any], name: str = "config.json") -> MegalodonConfig:
    """The `MegalodonConfig` of a megalodon-hf `config.json` (`name` labels errors).

    Fields megalodon-hf leaves at their defaults may be absent (its defaults apply); generic
    `transformers` keys are ignored. Settings with no counterpart here are refused
    (`efficient_attn`) or logged (a KV cache other than the chunk-local one).

    Raises:
        ConfigError: Not a megalodon config, or a value this implementation refuses.
    """
    model_type = values.get("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        raise ConfigError(f"{name} describes model_type {model_type!r}, not {MODEL_TYPE!r}")
    if values.get("efficient_attn") is not None:
        raise ConfigError(
            f"{name}: efficient_attn={values['efficient_attn']!r} selects upstream fused "
            "kernels that neither megalodon-hf nor this implementation has; it must be null"
        )
    # megalodon-hf defaults (spec §1.1) for fields the file leaves out.
    fields = {f: values[f] for f in SHARED_FIELDS if f in values}
    chunk = fields.get("chunk_size", MegalodonConfig.chunk_size)
    unbounded = bool(values.get("cache_unbounded", False))
    cache_len = values.get("max_cache_len")
    if unbounded or (cache_len is not None and cache_len != chunk):
        logging.warning(
            "%s: megalodon-hf's KV cache (max_cache_len=%s, cache_unbounded=%s) has no "
            "counterpart here; streaming uses the chunk-local cache of chunk_size=%d keys.",
            name,
            cache_len,
            unbounded,
            chunk,
        )
    if fields.get("init_mode") == "none":  # initialization does not matter for loaded weights
        fields["init_mode"] = MegalodonConfig.init_mode
    fields["remat_policy"] = "full" if values.get("gradient_checkpointing", False) else "none"
    try:
        return MegalodonConfig(**fields)
    except (ConfigError, TypeError) as err:
        raise ConfigError(f"{name}: {err}") from None


def model_differences(a: MegalodonConfig, b: MegalodonConfig) -> list[str]:
    """`field: a vs b` for each `MODEL_FIELDS` entry where the two configs differ."""
    return [
        f"{field}: {getattr(a, field)!r} vs {getattr(b, field)!r}"
        for field in MODEL_FIELDS
        if getattr(a, field) != getattr(b, field)
    ]
