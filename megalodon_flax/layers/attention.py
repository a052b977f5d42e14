"""Softmax attention over an arbitrary boolean mask, with a memory-saving backward pass.

Scores accumulate in float32, the softmax is float32, and a query row with no allowed key
outputs zeros. The hand-written VJP keeps only the probabilities for the backward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from megalodon_flax.layers import remat

DropoutFn = Callable[[jax.Array], jax.Array]
MASKED_SCORE = -1e30


def masked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    allowed: jax.Array,
    compute_dtype=jnp.float32,
    prob_dropout: DropoutFn | None = None,
) -> jax.Array:
    """Softmax attention restricted to `allowed` key positions.

    Args:
      q: (..., Lq, H, Dh); k: (..., Lk, H, Dh); v: (..., Lk, H, Dv).
      allowed: bool, broadcastable to (..., H, Lq, Lk).
      compute_dtype: dtype of the probabilities in the P·V product and of the output.
      prob_dropout: optional dropout on the probabilities.

    Returns:
      (..., Lq, H, Dv) in compute_dtype; rows with no allowed key are 0.
    """
    if prob_dropout is None:
        return _softmax_attention(q, k, v, allowed, jnp.dtype(compute_dtype))
    probs = prob_dropout(_attention_probs(q, k, allowed))
    return _probs_times_values(probs, v, compute_dtype)


def _attention_probs(q: jax.Array, k: jax.Array, allowed: jax.Array) -> jax.Array:
    """float32 probabilities (..., H, Lq, Lk); exactly 0 where not allowed (tagged for remat)."""
    scores = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(allowed, scores, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(jnp.any(allowed, axis=-1, keepdims=True), probs, 0.0)
    return checkpoint_name(probs, remat.ATTENTION_PROBS)


def _probs_times_values(probs: jax.Array, v: jax.Array, compute_dtype) -> jax.Array:
    out = jnp.einsum(
        "...hqk,...khd->...qhd",
        probs.astype(compute_dtype),
        v.astype(compute_dtype),
        preferred_element_type=jnp.float32,
    )
    return out.astype(compute_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_attention(q, k, v, allowed, compute_dtype):
    return _probs_times_values(_attention_probs(q, k, allowed), v, compute_dtype)


def _softmax_attention_fwd(q, k, v, allowed, compute_dtype):
    probs = _attention_probs(q, k, allowed)
    return _probs_times_values(probs, v, compute_dtype), (q, k, v, probs)


def _softmax_attention_bwd(compute_dtype, residuals, d_out):
    """The autodiff gradients, keeping only the probabilities for the backward pass (not the
    masked scores, the exponentials and the masks that differentiation would keep)."""
    q, k, v, probs = residuals
    f32 = jnp.float32
    d_out = d_out.astype(compute_dtype)
    d_v = jnp.einsum(
        "...hqk,...qhd->...khd", probs.astype(compute_dtype), d_out, preferred_element_type=f32
    )
    d_probs = jnp.einsum(
        "...qhd,...khd->...hqk", d_out, v.astype(compute_dtype), preferred_element_type=f32
    )
    # Softmax backward; masked entries have probability 0 and so get no gradient.
    d_scores = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
    d_q = jnp.einsum("...hqk,...khd->...qhd", d_scores, k, preferred_element_type=f32)
    d_k = jnp.einsum("...hqk,...qhd->...khd", d_scores, q, preferred_element_type=f32)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)
