"""RMSNorm, LayerNorm and the per-head Q/K RMS normalization (statistics in float32).

Megalodon's scales use the stored+1 convention (effective scale 1 + stored, stored
initialized 0: `offset=1`); the Llama baseline stores the scale itself (`offset=0`, stored
initialized 1).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from megalodon_flax.layers import initializers


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x · rsqrt(mean(x², last axis) + eps) in float32 (no affine)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """RMS normalization over the last axis with the scale (offset + stored) (D,).

    Attributes:
      eps: added inside the rsqrt.
      affine: whether the scale parameter exists.
      param_name: name of the scale parameter.
      offset: 1 stores the scale minus one (initialized 0), 0 stores the scale (initialized 1).
    """

    eps: float = 1e-5
    affine: bool = True
    param_name: str = "gamma"
    offset: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., D) → float32 (..., D)."""
        y = rms_normalize(x, self.eps)
        if self.affine:
            scale = self.param(
                self.param_name,
                nn.with_logical_partitioning(initializers.constant(1.0 - self.offset), ("embed",)),
                (x.shape[-1],),
            )
            y = y * (self.offset + scale)
        return y


class LayerNorm(nn.Module):
    """LayerNorm (population variance) with stored+1 `weight` and `bias` (D,).

    Attributes:
      eps: added to the variance inside the rsqrt.
      affine: whether `weight` and `bias` exist.
    """

    eps: float = 1e-5
    affine: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., D) → float32 (..., D)."""
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        centered = x - mean
        var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
        y = centered * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            dim = x.shape[-1]
            weight = self.param(
                "weight", nn.with_logical_partitioning(initializers.zeros, ("embed",)), (dim,)
            )
            bias = self.param(
                "bias", nn.with_logical_partitioning(initializers.zeros, ("embed",)), (dim,)
            )
            y = y * (1.0 + weight) + bias
        return y
