"""Streaming state pytrees (spec §5.2) and their fresh construction."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from megalodon_flax.megalodon.config import MegalodonConfig
from megalodon_flax.megalodon.timestep_norm import NormState


@struct.dataclass
class AttentionCache:
    """Ring buffer of the last C rotated keys and values.

    Token t is written to slot t mod C, so slot j holds the latest time τ_j ≡ j (mod C)
    (zeros until a token reaches it). Only slots of the current chunk (τ_j ≥ C·⌊T/C⌋) are
    attended; the others hold finished chunks and are masked, never cleared. Stored in the
    layouts the one-token products read directly, row b·H + h for batch row b and head h:
    keys (B·H, Dh, C) (slots last), values (B·H, C, Dv), compute dtype.
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
                keys=jnp.zeros((batch_size * h, config.head_dim, c), dtype),
                values=jnp.zeros((batch_size * h, c, config.value_head_dim), dtype),
            ),
            position=jnp.zeros((), jnp.int32),
        )

    return ModelCache(
        layers=tuple(layer() for _ in range(config.num_layers)),
        final_norm=NormState.fresh(batch_size, config.norm_num_groups),
    )
