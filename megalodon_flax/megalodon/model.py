"""The Megalodon block, the backbone and the causal language model (spec §2)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from megalodon_flax.layers import initializers
from megalodon_flax.layers.linear import Linear
from megalodon_flax.megalodon.cache import LayerCache, ModelCache
from megalodon_flax.megalodon.config import MegalodonConfig
from megalodon_flax.megalodon.ffn import NormalizedFFN
from megalodon_flax.megalodon.mega import MovingAverageGatedAttention
from megalodon_flax.megalodon.timestep_norm import TimestepNorm


class MegalodonBlock(nn.Module):
    """out = x + FFN(LN(x + h_attn(x))): gated attention sub-block, then the normalized FFN
    whose residual is the block input x (two-hop residual)."""

    config: MegalodonConfig
    layer_index: int = 0

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cache: LayerCache | None = None,
        mask: jax.Array | None = None,
        deterministic: bool = True,
        return_cache: bool = False,
    ) -> tuple[jax.Array, LayerCache | None]:
        """x (B, L, D) → (B, L, D) and the layer's updated cache (None without a cache)."""
        y, cache = MovingAverageGatedAttention(self.config, name="attn")(
            x, cache, mask, deterministic, return_cache
        )
        out = NormalizedFFN(self.config, self.layer_index, name="ffn")(y, x, deterministic)
        return nn.with_logical_constraint(out, ("batch", "length", "act_embed")), cache


class MegalodonModel(nn.Module):
    """Embedding, the stack of blocks and the final streaming TimestepNorm."""

    config: MegalodonConfig

    def setup(self) -> None:
        cfg = self.config
        self.embed = nn.Embed(
            cfg.vocab_size,
            cfg.model_dim,
            embedding_init=nn.with_logical_partitioning(
                initializers.embedding(cfg.model_dim), ("vocab", "embed")
            ),
            dtype=cfg.compute_jnp_dtype,
            param_dtype=cfg.params_jnp_dtype,
        )
        block = MegalodonBlock
        if cfg.remat:
            block = nn.remat(MegalodonBlock, static_argnums=(4, 5))
        self.layers = [block(cfg, i) for i in range(cfg.num_layers)]
        self.norm = TimestepNorm(cfg.norm_num_groups, cfg.norm_eps, cfg.timestep_norm_variant)
        self.embedding_dropout = nn.Dropout(cfg.dropout)

    def __call__(
        self,
        tokens: jax.Array,
        cache: ModelCache | None = None,
        mask: jax.Array | None = None,
        deterministic: bool = True,
        return_cache: bool = False,
    ) -> tuple[jax.Array, ModelCache | None]:
        """tokens (B, L) int → final hidden states (B, L, D) compute dtype, updated cache."""
        cfg = self.config
        x = self.embed(tokens)
        if cfg.scale_emb:
            x = x * jnp.asarray(math.sqrt(cfg.model_dim), x.dtype)
        if cfg.dropout > 0.0 and cfg.embedding_dropout:
            x = self.embedding_dropout(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        new_layers = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            x, layer_cache = layer(x, layer_cache, mask, deterministic, return_cache)
            new_layers.append(layer_cache)
        x, final_state = self.norm(x, None if cache is None else cache.final_norm, mask)
        if cache is None and not return_cache:
            return x, None
        return x, ModelCache(layers=tuple(new_layers), final_norm=final_state)

    def embedding_logits(self, x: jax.Array) -> jax.Array:
        """Tied head: x (B, L, D) · embeddingᵀ → float32 (B, L, V)."""
        cd = self.config.compute_jnp_dtype
        table = self.embed.embedding.astype(cd)
        return jnp.dot(x.astype(cd), table.T, preferred_element_type=jnp.float32)


class MegalodonLM(nn.Module):
    """Causal language model.

    Called as `logits, cache = model.apply(variables, tokens, cache=None, attention_mask=None,
    deterministic=True)`: tokens (B, L) int32 → logits (B, L, V_out) float32. With `cache`
    (from `init_cache` or a previous call) the call continues the streams and returns the
    updated cache; without it every row starts fresh and the returned cache is None.
    `return_cache=True` without a cache starts fresh streams on the vectorized path and
    returns their cache (a faster prefill than passing `init_cache`). `attention_mask`
    (B, L) marks valid tokens (right padding only); it cannot be combined with a cache.
    Dropout needs `rngs={'dropout': key}` when `deterministic=False`.
    """

    config: MegalodonConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        *,
        cache: ModelCache | None = None,
        attention_mask: jax.Array | None = None,
        deterministic: bool = True,
        return_cache: bool = False,
    ) -> tuple[jax.Array, ModelCache | None]:
        cfg = self.config
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"tokens must be an int array (B, L), got {tokens.dtype}{tokens.shape}"
            )
        if tokens.shape[1] == 0:
            raise ValueError("tokens must hold at least one position (L >= 1)")
        if attention_mask is not None and (cache is not None or return_cache):
            raise ValueError(
                "attention_mask cannot be combined with a cache (streaming calls "
                "take unpadded tokens)"
            )
        if attention_mask is not None and attention_mask.shape != tokens.shape:
            raise ValueError(
                f"attention_mask shape {attention_mask.shape} != tokens shape {tokens.shape}"
            )
        _reject_float16(self.variables)
        mask = None if attention_mask is None else attention_mask.astype(bool)
        model = MegalodonModel(cfg, name="model")
        hidden, cache = model(tokens, cache, mask, deterministic, return_cache)
        if cfg.tied:
            logits = model.embedding_logits(hidden)
        else:
            logits = Linear(
                cfg.output_width,
                ("embed", "vocab"),
                use_bias=False,
                kernel_init=initializers.embedding(cfg.model_dim),
                param_dtype=cfg.params_jnp_dtype,
                compute_dtype=cfg.compute_jnp_dtype,
                output_dtype=jnp.float32,
                name="lm_head",
            )(hidden)
        return logits, cache


def _reject_float16(variables) -> None:
    for leaf in jax.tree.leaves(variables):
        if getattr(leaf, "dtype", None) == jnp.float16:
            raise ValueError(
                "float16 parameters are not supported (CEMA powers and TimestepNorm moments "
                "overflow or lose precision in float16); use float32 or bfloat16"
            )
