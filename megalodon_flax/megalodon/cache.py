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
    """State of one block: TimestepNorm statistics, CEMA h (B, D, N) complex64, the KV ring,
    and the number of tokens consumed (int32 scalar, see `advanced_position`)."""

    norm: NormState
    cema: jax.Array
    attn: AttentionCache
    position: jax.Array


# Positions wrap back by the largest multiple of the chunk size below this.
POSITION_WRAP = 1 << 30


def advanced_position(position: jax.Array, length: int, chunk_size: int) -> jax.Array:
    """The position after `length` more tokens: the count of tokens consumed, until it
    reaches chunk_size + M (M the largest multiple of chunk_size ≤ 2^30); then it moves back
    by M. Attention and RoPE use only the place in the chunk grid (position mod chunk_size)
    and whether a whole chunk precedes it, which the wrap keeps, so a stream never overflows.
    """
    span = POSITION_WRAP // chunk_size * chunk_size
    new = position + length
    return jnp.where(new >= chunk_size + span, new - span, new)


@struct.dataclass
class ModelCache:
    """Per-layer caches plus the final TimestepNorm state.

    `layers` is a tuple of one `LayerCache` per block, or, for a config with `scan_layers`,
    one `LayerCache` whose leaves are stacked on a leading num_layers axis.
    """

    layers: tuple[LayerCache, ...] | LayerCache
    final_norm: NormState

    def layer_caches(self) -> tuple[LayerCache, ...]:
        """One `LayerCache` per block, in either layout."""
        if isinstance(self.layers, LayerCache):
            count = self.layers.position.shape[0]
            return tuple(jax.tree.map(lambda a, i=i: a[i], self.layers) for i in range(count))
        return tuple(self.layers)

    @property
    def position(self) -> jax.Array:
        """Tokens consumed so far (int32 scalar; wraps as `advanced_position` says)."""
        if isinstance(self.layers, LayerCache):
            return self.layers.position[0]
        return self.layers[0].position


def init_cache(config: MegalodonConfig, batch_size: int, dtype: Any = None) -> ModelCache:
    """A fresh cache for `batch_size` streams (no tokens consumed), in the layer layout of
    `config` (stacked for `scan_layers`)."""
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

    if config.scan_layers:
        one = layer()
        layers = jax.tree.map(lambda a: jnp.repeat(a[None], config.num_layers, axis=0), one)
    else:
        layers = tuple(layer() for _ in range(config.num_layers))
    return ModelCache(layers=layers, final_norm=NormState.fresh(batch_size, config.norm_num_groups))
