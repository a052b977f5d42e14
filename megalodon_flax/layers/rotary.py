"""Rotary position embedding on chunk-local positions (spec §2.5), computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, base: float) -> jax.Array:
    """ω_j = base^(−2j/Dh) for j < Dh/2, float32 (Dh/2,)."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return jnp.power(jnp.float32(base), -exponents)


def apply_rope(
    x: jax.Array, positions: jax.Array, freqs: jax.Array, layout: str = "adjacent"
) -> jax.Array:
    """Rotates pairs of x by angle pos·ω_j.

    Args:
      x: (B, L, H, Dh).
      positions: (L,) or (B, L) integer or float positions.
      freqs: (Dh/2,) float32.
      layout: "adjacent" pairs (x[2j], x[2j+1]); "half_split" pairs (x[j], x[j + Dh/2]).

    Returns:
      float32 (B, L, H, Dh).
    """
    x = x.astype(jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # (.., L, Dh/2)
    if angles.ndim == 2:
        angles = angles[None]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    if layout == "adjacent":
        x_even, x_odd = x[..., 0::2], x[..., 1::2]
    elif layout == "half_split":
        half = x.shape[-1] // 2
        x_even, x_odd = x[..., :half], x[..., half:]
    else:
        raise ValueError(f"unknown rope layout {layout!r}")
    rot_even = x_even * cos - x_odd * sin
    rot_odd = x_odd * cos + x_even * sin
    if layout == "adjacent":
        return jnp.stack([rot_even, rot_odd], axis=-1).reshape(x.shape)
    return jnp.concatenate([rot_even, rot_odd], axis=-1)
