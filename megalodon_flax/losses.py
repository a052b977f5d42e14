"""Language-model losses: per-token cross-entropy in float32 and its weighted reductions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

LN2 = math.log(2.0)


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood in nats.

    Args:
        logits: `(..., V)` logits (computed in float32).
        targets: `(...)` integer targets in `[0, V)`.

    Returns:
        float32 `(...)` losses `-log softmax(logits)[target]`.
    """
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets.astype(jnp.int32)
    )


def weighted_loss_sum(
    logits: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Weighted sum of per-token losses.

    Args:
        logits: `(B, L, V)` logits.
        targets: `(B, L)` integer targets.
        weights: `(B, L)` weights, 0 on padding.

    Returns:
        `(sum_t w_t * loss_t, sum_t w_t, per-token losses (B, L))`, all float32. Positions with
        weight 0 contribute exactly 0 (their loss is masked out, not multiplied).
    """
    losses = token_cross_entropy(logits, targets)
    weights = weights.astype(jnp.float32)
    masked = jnp.where(weights > 0, losses * weights, 0.0)
    return masked.sum(), weights.sum(), losses


def nats_to_bits(loss: jax.Array | float) -> jax.Array | float:
    """Converts a loss in nats per byte to bits per byte."""
    return loss / LN2
