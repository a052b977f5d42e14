"""The Llama baseline's decode state: per-layer KV buffers of a fixed capacity."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from megalodon_flax.llama.config import LlamaConfig


@flax.struct.dataclass
class LayerKV:
    """Keys and values of one layer: each (B, T, H, Dh) in the compute dtype."""

    keys: jax.Array
    values: jax.Array


@flax.struct.dataclass
class LlamaCache:
    """Decode state: per-layer KV buffers of capacity T and the number of filled positions."""

    layers: tuple[LayerKV, ...]
    length: jax.Array  # () int32


def init_cache(config: LlamaConfig, batch_size: int, capacity: int) -> LlamaCache:
    """An empty cache holding up to `capacity` positions per row."""
    shape = (batch_size, capacity, config.num_heads, config.head_dim)
    zeros = jnp.zeros(shape, config.compute_jnp_dtype)
    return LlamaCache(
        layers=tuple(LayerKV(zeros, zeros) for _ in range(config.num_layers)),
        length=jnp.zeros((), jnp.int32),
    )
