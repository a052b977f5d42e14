"""Chunked normalized attention and the moving-average gated attention sub-block (spec §2.3, §5).

Attention is block-diagonal causal: a query at absolute time t sees keys s ≤ t of the same
chunk floor(s/C) = floor(t/C). Scores q·k carry no 1/sqrt(Dh) (Q/K are normalized) and
accumulate in float32; the softmax is float32; a row with no visible key outputs zeros.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from megalodon_flax.config import MegalodonConfig
from megalodon_flax.model import initializers
from megalodon_flax.model.cache import AttentionCache, LayerCache
from megalodon_flax.model.cema import CEMA
from megalodon_flax.model.linear import fused_linears, internal_linear
from megalodon_flax.model.norms import RMSNorm, rms_normalize
from megalodon_flax.model.rotary import apply_rope, rope_frequencies
from megalodon_flax.model.timestep_norm import TimestepNorm

DropoutFn = Callable[[jax.Array], jax.Array]
_MASKED_SCORE = -1e30


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
    """float32 probabilities (..., H, Lq, Lk); exactly 0 where not allowed."""
    scores = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(allowed, scores, _MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.where(jnp.any(allowed, axis=-1, keepdims=True), probs, 0.0)


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


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    chunk_size: int,
    key_valid: jax.Array | None = None,
    compute_dtype=jnp.float32,
    prob_dropout: DropoutFn | None = None,
) -> jax.Array:
    """Block-diagonal causal attention for a sequence starting at a chunk boundary.

    Args:
      q, k: (B, L, H, Dh); v: (B, L, H, Dv); any L (the last chunk is padded internally).
      chunk_size: C.
      key_valid: (B, L) bool, False for keys that must never be attended.

    Returns:
      (B, L, H, Dv) in compute_dtype.
    """
    batch, length = q.shape[:2]
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length

    def chunks(a: jax.Array) -> jax.Array:
        a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
        return a.reshape((batch, num_chunks, chunk_size, *a.shape[2:]))

    allowed = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
    if key_valid is not None:
        kv = chunks(key_valid.astype(bool))  # (B, n, C)
        allowed = allowed & kv[:, :, None, None, :]
    out = masked_attention(chunks(q), chunks(k), chunks(v), allowed, compute_dtype, prob_dropout)
    return out.reshape((batch, num_chunks * chunk_size, *out.shape[3:]))[:, :length]


# Rings are stored as (B·H, Dh, C) for keys and (B·H, C, Dv) for values (row b·H + h): the
# operand layouts of the one-token products, batch axes already merged. With any other
# layout XLA either copies the rings into that layout on every decode step or, because a
# reshape then sits between the slot write and the products, writes the slot twice into
# copies of the ring instead of once in place.
_KEY_RING = (0, 2, 3, 1)  # token-major (B, C, H, Dh) axes → stored (B, H, Dh, C) order
_VALUE_RING = (0, 2, 1, 3)  # (B, C, H, Dv) → (B, H, C, Dv)


def _to_ring(entries: jax.Array, order: tuple[int, ...]) -> jax.Array:
    """(B, C, H, ·) time-slot entries → the stored (B·H, ·, ·) ring."""
    ring = jnp.transpose(entries, order)
    return ring.reshape((-1, *ring.shape[2:]))


def _from_ring(ring: jax.Array, batch: int, order: tuple[int, ...]) -> jax.Array:
    """The stored ring → (B, C, H, ·) entries by slot."""
    ring = ring.reshape((batch, -1, *ring.shape[1:]))
    return jnp.transpose(ring, tuple(order.index(i) for i in range(4)))


def ring_entries(cache: AttentionCache, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """The ring by slot in the token-major layout: keys (B, C, H, Dh), values (B, C, H, Dv)."""
    return (
        _from_ring(cache.keys, batch_size, _KEY_RING),
        _from_ring(cache.values, batch_size, _VALUE_RING),
    )


def ring_from_entries(keys: jax.Array, values: jax.Array) -> AttentionCache:
    """The inverse of `ring_entries`: keys (B, C, H, Dh), values (B, C, H, Dv) by slot."""
    return AttentionCache(keys=_to_ring(keys, _KEY_RING), values=_to_ring(values, _VALUE_RING))


def _time_ordered_ring(
    ring: jax.Array, batch: int, order: tuple[int, ...], position: jax.Array, chunk_size: int
) -> jax.Array:
    """Stored ring → (B, C, H, ·) entries ordered by time T−C … T−1 (T = position)."""
    return jnp.roll(_from_ring(ring, batch, order), -(position % chunk_size), axis=1)


def _updated_ring(
    ordered: jax.Array,
    new: jax.Array,
    position: jax.Array,
    chunk_size: int,
    order: tuple[int, ...],
) -> jax.Array:
    """Stored ring after appending `new` (B, L, H, ·) to time-ordered entries (B, C, H, ·):
    slot j holds the latest of the C most recent times ≡ j (mod C)."""
    length = new.shape[1]
    end = position + length
    last = jnp.concatenate([ordered, new], axis=1)[:, length:]  # times end−C … end−1
    return _to_ring(jnp.roll(last, end % chunk_size, axis=1), order)


def _decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache: AttentionCache,
    position: jax.Array,
    chunk_size: int,
    compute_dtype,
) -> tuple[jax.Array, AttentionCache]:
    """`streaming_attention` for one new token (L = 1) without reordering the ring.

    The token is written in place at slot s = T mod C and attends to slots 0 … s, which hold
    times T − s … T of its chunk; the slots after s hold finished chunks and are masked.
    """
    slot = position % chunk_size
    batch, _, heads, dh = q.shape
    rows = batch * heads
    keys = jax.lax.dynamic_update_slice_in_dim(
        cache.keys, k.reshape(rows, dh, 1).astype(cache.keys.dtype), slot, axis=2
    )
    values = jax.lax.dynamic_update_slice_in_dim(
        cache.values, v.reshape(rows, 1, -1).astype(cache.values.dtype), slot, axis=1
    )
    scores = jnp.einsum(
        "nd,ndk->nk", q.reshape(rows, dh), keys.astype(q.dtype), preferred_element_type=jnp.float32
    )
    scores = jnp.where(jnp.arange(chunk_size) <= slot, scores, _MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(compute_dtype)
    out = jnp.einsum(
        "nk,nkd->nd", probs, values.astype(compute_dtype), preferred_element_type=jnp.float32
    )
    out = out.reshape(batch, 1, heads, -1).astype(compute_dtype)
    return out, AttentionCache(keys=keys, values=values)


def streaming_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache: AttentionCache,
    position: jax.Array,
    chunk_size: int,
    compute_dtype=jnp.float32,
) -> tuple[jax.Array, AttentionCache]:
    """Attention of L new tokens at times T … T+L−1 against the ring and themselves.

    Args:
      q, k: (B, L, H, Dh) rotated; v: (B, L, H, Dv).
      cache: the ring of the last C keys/values before the call (see AttentionCache).
      position: T, tokens consumed before the call (int32 scalar).
      chunk_size: C (= ring capacity).

    Returns:
      (B, L, H, Dv) outputs and the ring after the call.
    """
    c = chunk_size
    length = q.shape[1]
    if length == 1:
        return _decode_attention(q, k, v, cache, position, c, compute_dtype)
    batch = q.shape[0]
    ring_k = _time_ordered_ring(cache.keys, batch, _KEY_RING, position, c).astype(k.dtype)
    ring_v = _time_ordered_ring(cache.values, batch, _VALUE_RING, position, c).astype(v.dtype)
    all_k = jnp.concatenate([ring_k, k], axis=1)
    all_v = jnp.concatenate([ring_v, v], axis=1)
    if length <= c:
        # Dense scores against C cached slots + the new keys: O(L·(C+L)).
        key_times = position - c + jnp.arange(c + length)
        query_times = position + jnp.arange(length)
        allowed = (
            (key_times[None, :] <= query_times[:, None])
            & (key_times[None, :] >= 0)
            & (key_times[None, :] // c == query_times[:, None] // c)
        )
        out = masked_attention(q, all_k, all_v, allowed, compute_dtype)
    else:
        # Align the new tokens on the absolute chunk grid, prefixed by the cached slots of
        # the current chunk, and reuse the chunked kernel: O((L+C)·C).
        offset = position % c
        num_chunks = -(-(c - 1 + length) // c)
        span = num_chunks * c
        tail = span - length

        def aligned(a: jax.Array, head: jax.Array) -> jax.Array:
            padded = jnp.concatenate(
                [head, a, jnp.zeros((a.shape[0], tail, *a.shape[2:]), a.dtype)], axis=1
            )
            return jax.lax.dynamic_slice_in_dim(padded, c - offset, span, axis=1)

        key_valid = jnp.arange(span) < offset + length
        key_valid = jnp.broadcast_to(key_valid, (q.shape[0], span))
        out = chunked_attention(
            aligned(q, jnp.zeros_like(ring_k).astype(q.dtype)),
            aligned(k, ring_k),
            aligned(v, ring_v),
            c,
            key_valid,
            compute_dtype,
        )
        out = jax.lax.dynamic_slice_in_dim(out, offset, length, axis=1)
    new_cache = AttentionCache(
        keys=_updated_ring(ring_k, k, position, c, _KEY_RING).astype(cache.keys.dtype),
        values=_updated_ring(ring_v, v, position, c, _VALUE_RING).astype(cache.values.dtype),
    )
    return out, new_cache


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
        deterministic: bool = True,
        return_cache: bool = False,
    ) -> tuple[jax.Array, LayerCache | None]:
        """x (B, L, D) compute dtype → (x + h (B, L, D), updated cache or None).

        With `cache=None` and `return_cache=True` the call starts from a fresh state on the
        vectorized path (no initial-state terms) and returns the state after it.
        """
        cfg = self.config
        cd = cfg.compute_jnp_dtype
        batch, length, dim = x.shape
        heads, dh, dv = cfg.num_heads, cfg.head_dim, cfg.value_head_dim

        def dropout(a: jax.Array, rate: float) -> jax.Array:
            if rate == 0.0 or deterministic:
                return a
            return nn.Dropout(rate)(a, deterministic=False)

        x_tn, norm_state = TimestepNorm(
            cfg.norm_num_groups, cfg.norm_eps, cfg.timestep_norm_variant, name="timenorm"
        )(x, None if cache is None else cache.norm, mask)

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

        start = jnp.zeros((), jnp.int32) if cache is None else cache.position
        positions = (start + jnp.arange(length, dtype=jnp.int32)) % cfg.chunk_size
        freqs = rope_frequencies(dh, cfg.effective_rope_base)
        q = apply_rope(q, positions, freqs, cfg.rope_layout).astype(cd)
        k = apply_rope(k, positions, freqs, cfg.rope_layout).astype(cd)

        if cache is None:
            prob_dropout = None
            if cfg.attention_dropout > 0.0 and not deterministic:
                prob_dropout = nn.Dropout(cfg.attention_dropout, deterministic=False)
            o = chunked_attention(q, k, v, cfg.chunk_size, mask, cd, prob_dropout)
            new_cache = None
            if return_cache:
                start = jnp.zeros((), jnp.int32)
                empty_k = jnp.zeros((batch, cfg.chunk_size, heads, dh), cd)  # time-ordered
                empty_v = jnp.zeros((batch, cfg.chunk_size, heads, dv), cd)
                new_cache = LayerCache(
                    norm=norm_state,
                    cema=cema_state,
                    attn=AttentionCache(
                        keys=_updated_ring(empty_k, k, start, cfg.chunk_size, _KEY_RING),
                        values=_updated_ring(empty_v, v, start, cfg.chunk_size, _VALUE_RING),
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
                position=cache.position + length,
            )

        g = o.reshape(batch, length, cfg.value_dim) * r
        g = dropout(g, cfg.hidden_dropout)
        h = h1.astype(jnp.float32)
        h = h + internal_linear(cfg, "wh2", dim, ("value", "embed_out"), cfg.value_dim)(g)
        h = dropout(h.astype(cd), cfg.dropout)
        return x + h, new_cache
