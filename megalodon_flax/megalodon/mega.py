"""The moving-average gated attention sub-block: part A of a Megalodon block (spec §2.3).

TimestepNorm → CEMA → RMSNorm → gated chunked attention, returning y = x + h.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from megalodon_flax.layers import initializers
from megalodon_flax.layers.linear import fused_linears
from megalodon_flax.layers.norms import RMSNorm, rms_normalize
from megalodon_flax.layers.rotary import apply_rope, rope_frequencies
from megalodon_flax.layers.segments import Segments
from megalodon_flax.megalodon import context_parallel
from megalodon_flax.megalodon.cache import AttentionCache, LayerCache, advanced_position
from megalodon_flax.megalodon.cema_layer import CEMA
from megalodon_flax.megalodon.chunked_attention import (
    KEY_RING,
    VALUE_RING,
    chunked_attention,
    packed_chunked_attention,
    sharded_packed_attention,
    streaming_attention,
    updated_ring,
)
from megalodon_flax.megalodon.config import MegalodonConfig
from megalodon_flax.megalodon.internal_linear import internal_linear
from megalodon_flax.megalodon.timestep_norm import TimestepNorm


class MovingAverageGatedAttention(nn.Module):
    """Part A of a Megalodon block: TimestepNorm → CEMA → RMSNorm → gated chunked attention.

    Returns y = x + h (spec §2.3 A1-A14) and the normalized input's residual is the caller's.
    """

    config: MegalodonConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cache: LayerCache | None = None,
        mask: jax.Array | None = None,
        segments: Segments | None = None,
        deterministic: bool = True,
        return_cache: bool = False,
    ) -> tuple[jax.Array, LayerCache | None]:
        """x (B, L, D) compute dtype → (x + h (B, L, D), updated cache or None).

        With `cache=None` and `return_cache=True` the call starts from a fresh state on the
        vectorized path (no initial-state terms) and returns the state after it.
        `segments` (packed rows, no cache) resets every component at each run start.
        """
        cfg = self.config
        cd = cfg.compute_jnp_dtype
        batch, length, dim = x.shape
        heads, dh, dv = cfg.num_heads, cfg.head_dim, cfg.value_head_dim

        def dropout(a: jax.Array, rate: float) -> jax.Array:
            if rate == 0.0 or deterministic:
                return a
            return nn.Dropout(rate)(a, deterministic=False)

        split = None
        if cache is None and not return_cache:
            split = context_parallel.active_split(batch, length)
        x_tn, norm_state = TimestepNorm(
            cfg.norm_num_groups, cfg.norm_eps, cfg.timestep_norm_variant, name="timenorm"
        )(x, None if cache is None else cache.norm, mask, split, segments)

        if cache is None and not return_cache:
            cema_path, want_state = cfg.cema_path, False
        elif length < cfg.sequential_cema_below:
            cema_path, want_state = "sequential", True
        else:
            cema_path = "scan" if cfg.cema_path == "scan" else "fft"
            want_state = True
        c, cema_state = CEMA(cfg.cema_ndim, cfg.cema_block_size, name="cema")(
            x_tn,
            mask if cfg.mask_cema_inputs else None,
            None if cache is None else cache.cema,
            cema_path,
            want_state,
            split,
            segments,
        )

        mx = RMSNorm(cfg.norm_eps, cfg.norm_affine, "gamma", name="rmsnorm")(c).astype(cd)
        mx = dropout(mx, cfg.hidden_dropout)
        mx = nn.with_logical_constraint(mx, ("batch", "length", "act_embed"))

        wz = internal_linear(cfg, "wz", cfg.z_dim, ("embed", "qk"), dim)
        wv = internal_linear(cfg, "wv", cfg.value_dim, ("embed", "value"), dim)
        wr = internal_linear(cfg, "wr", cfg.value_dim, ("embed", "value"), dim)
        wh1 = internal_linear(cfg, "wh1", dim, ("embed", "embed_out"), dim)
        z, r, h1 = fused_linears([wz, wr, wh1], mx)
        v = wv(x_tn)
        z_hat = rms_normalize(z.reshape(batch, length, heads, dh), cfg.norm_eps)
        qk_gamma = self.param(
            "gamma", nn.with_logical_partitioning(initializers.zeros, (None, "qk")), (2, cfg.z_dim)
        ).reshape(2, heads, dh)
        qk_beta = self.param(
            "beta", nn.with_logical_partitioning(initializers.zeros, (None, "qk")), (2, cfg.z_dim)
        ).reshape(2, heads, dh)
        scale = (1.0 + qk_gamma) / math.sqrt(dh)
        q = z_hat * scale[0] + qk_beta[0]
        k = z_hat * scale[1] + qk_beta[1]

        v = jax.nn.silu(v).reshape(batch, length, heads, dv)
        r = jax.nn.silu(r)

        if segments is not None:
            positions = segments.position % cfg.chunk_size
        else:
            start = jnp.zeros((), jnp.int32) if cache is None else cache.position
            positions = (start + jnp.arange(length, dtype=jnp.int32)) % cfg.chunk_size
        freqs = rope_frequencies(dh, cfg.effective_rope_base)
        q = apply_rope(q, positions, freqs, cfg.rope_layout).astype(cd)
        k = apply_rope(k, positions, freqs, cfg.rope_layout).astype(cd)

        if cache is None:
            prob_dropout = None
            if cfg.attention_dropout > 0.0 and not deterministic:
                prob_dropout = nn.Dropout(cfg.attention_dropout, deterministic=False)
            if segments is not None and split is not None:
                key = None if prob_dropout is None else self.make_rng("dropout")
                o = sharded_packed_attention(
                    q, k, v, cfg.chunk_size, segments, split, cd, cfg.attention_dropout, key
                )
            elif segments is not None:
                o = packed_chunked_attention(q, k, v, cfg.chunk_size, segments, cd, prob_dropout)
            else:
                o = chunked_attention(
                    q, k, v, cfg.chunk_size, mask, cd, prob_dropout, cfg.attention_impl
                )
            new_cache = None
            if return_cache:
                start = jnp.zeros((), jnp.int32)
                empty_k = jnp.zeros((batch, cfg.chunk_size, heads, dh), cd)  # time-ordered
                empty_v = jnp.zeros((batch, cfg.chunk_size, heads, dv), cd)
                new_cache = LayerCache(
                    norm=norm_state,
                    cema=cema_state,
                    attn=AttentionCache(
                        keys=updated_ring(empty_k, k, start, cfg.chunk_size, KEY_RING),
                        values=updated_ring(empty_v, v, start, cfg.chunk_size, VALUE_RING),
                    ),
                    position=start + length,
                )
        else:
            o, attn_cache = streaming_attention(
                q, k, v, cache.attn, cache.position, cfg.chunk_size, cd
            )
            new_cache = LayerCache(
                norm=norm_state,
                cema=cema_state,
                attn=attn_cache,
                position=advanced_position(cache.position, length, cfg.chunk_size),
            )

        g = o.reshape(batch, length, cfg.value_dim) * r
        g = dropout(g, cfg.hidden_dropout)
        h = h1.astype(jnp.float32)
        h = h + internal_linear(cfg, "wh2", dim, ("value", "embed_out"), cfg.value_dim)(g)
        h = dropout(h.astype(cd), cfg.dropout)
        return x + h, new_cache
