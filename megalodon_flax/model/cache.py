"""Streaming state pytrees (spec §5.2) and their fresh construction."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from megalodon_flax.config import MegalodonConfig
from megalodon_flax.model.timestep_norm import NormState


@struct.dataclass
class AttentionCache:
    """Ring buffer of rotated keys and values of the current chunk.

    Slot j holds the token whose absolute time τ satisfies τ ≡ j (mod C); slots outside the
    current chunk are zero. keys: (B, C, H, Dh), values: (B, C, H, Dv), compute dtype.
    """

    keys: jax.Array
    values: jax.Array


@struct.dataclass
class LayerCache:
    """State of one block: TimestepNorm (count, mean, var), CEMA h (B, D, N) complex64,
    the KV ring, and the number of tokens consumed (int32 scalar)."""

    norm: NormState
    cema: jax.Array
    attn: AttentionCache
    position: jax.Array


@struct.dataclass
class ModelCache:
    """Per-layer caches plus the final TimestepNorm state."""

    layers: tuple[LayerCache, ...]
    final_norm: NormState

    @property
    def position(self) -> jax.Array:
        """Tokens consumed so far (int32 scalar)."""
        return self.layers[0].position


def init_cache(config: MegalodonConfig, batch_size: int, dtype: Any = None) -> ModelCache:
    """A fresh cache for `batch_size` streams (no tokens consumed)."""
    dtype = config.compute_jnp_dtype if dtype is None else dtype
    c, h = config.chunk_size, config.num_heads

    def layer() -> LayerCache:
        return LayerCache(
            norm=NormState.fresh(batch_size, config.norm_num_groups),
            cema=jnp.zeros((batch_size, config.model_dim, config.cema_ndim), jnp.complex64),
            attn=AttentionCache(
                keys=jnp.zeros((batch_size, c, h, config.head_dim), dtype),
                values=jnp.zeros((batch_size, c, h, config.value_head_dim), dtype),
            ),
            position=jnp.zeros((), jnp.int32),
        )

    return ModelCache(
        layers=tuple(layer() for _ in range(config.num_layers)),
        final_norm=NormState.fresh(batch_size, config.norm_num_groups),
    )
