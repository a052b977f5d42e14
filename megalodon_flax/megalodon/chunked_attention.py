"""Chunked block-diagonal attention and its streaming ring buffer (spec §5).

Attention is block-diagonal causal: a query at absolute time t sees keys s ≤ t of the same
chunk floor(s/C) = floor(t/C). Scores q·k carry no 1/sqrt(Dh) (Q/K are normalized) and
accumulate in float32; the softmax is float32; a row with no visible key outputs zeros.
Packed rows (segment ids) give each run its own chunk grid; split over a context axis, each
shard takes the previous shard's last chunk of keys and values (`sharded_packed_attention`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from megalodon_flax.layers.attention import MASKED_SCORE, DropoutFn, masked_attention
from megalodon_flax.layers.segments import Segments
from megalodon_flax.megalodon import context_parallel
from megalodon_flax.megalodon.cache import AttentionCache


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    chunk_size: int,
    key_valid: jax.Array | None = None,
    compute_dtype=jnp.float32,
    prob_dropout: DropoutFn | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Block-diagonal causal attention for a sequence starting at a chunk boundary.

    Args:
      q, k: (B, L, H, Dh); v: (B, L, H, Dv); any L (the last chunk is padded internally).
      chunk_size: C.
      key_valid: (B, L) bool, False for keys that must never be attended. The
        "dot_product" kernel takes it as per-chunk key counts, so there it must be right
        padding (what the model passes).
      impl: "xla" (`layers.attention.masked_attention`), "dot_product"
        (`jax.nn.dot_product_attention`, chunks folded into the batch) or "auto" (see
        `resolve_attention_impl`). Probability dropout always takes the "xla" kernel.

    Returns:
      (B, L, H, Dv) in compute_dtype.
    """
    batch, length = q.shape[:2]
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length

    def chunks(a: jax.Array) -> jax.Array:
        a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
        return a.reshape((batch, num_chunks, chunk_size, *a.shape[2:]))

    if resolve_attention_impl(impl) == "dot_product" and prob_dropout is None:
        out = _dot_product_chunks(chunks(q), chunks(k), chunks(v), key_valid, chunks, compute_dtype)
    else:
        allowed = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
        if key_valid is not None:
            kv = chunks(key_valid.astype(bool))  # (B, n, C)
            allowed = allowed & kv[:, :, None, None, :]
        out = masked_attention(
            chunks(q), chunks(k), chunks(v), allowed, compute_dtype, prob_dropout
        )
    return out.reshape((batch, num_chunks * chunk_size, *out.shape[3:]))[:, :length]


# Query blocks per chunk in packed attention: each block of C/4 queries attends over the
# C + C/4 keys before its end that it can reach (1.25× the unpacked scores, not 2×).
PACKED_QUERY_BLOCKS = 4


def packed_chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    chunk_size: int,
    segments: Segments,
    compute_dtype=jnp.float32,
    prob_dropout: DropoutFn | None = None,
) -> jax.Array:
    """Chunked attention over packed rows: each run has its own chunk grid from its start.

    A query at run position ℓ sees the keys of its run at positions ℓ' ≤ ℓ with
    floor(ℓ'/C) = floor(ℓ/C), all within the previous C − 1 row positions. The row is cut
    into blocks of S = C / `PACKED_QUERY_BLOCKS` queries (S = C when that does not divide C),
    and each block attends over the C / S blocks before it and itself, masked; padding keys
    (segment 0) are never seen and padding queries output zeros.

    Args:
      q, k: (B, L, H, Dh); v: (B, L, H, Dv).
      chunk_size: C.
      segments: the run layout of the rows.

    Returns:
      (B, L, H, Dv) in compute_dtype.
    """
    batch, length = q.shape[:2]
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    tokens = _PackedTokens(index, segments.position, segments.valid)
    return _packed_band_attention(q, k, v, chunk_size, tokens, None, compute_dtype, prob_dropout)


class _PackedTokens(NamedTuple):
    """Where tokens lie in packed rows, each (B, T): index, the row position; position,
    within the run; valid, not padding."""

    index: jax.Array
    position: jax.Array
    valid: jax.Array


class _Halo(NamedTuple):
    """The C tokens before a context shard: keys (B, C, H, Dh), values (B, C, H, Dv) and
    where they lie."""

    keys: jax.Array
    values: jax.Array
    tokens: _PackedTokens


def _packed_band_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    chunk_size: int,
    tokens: _PackedTokens,
    halo: _Halo | None,
    compute_dtype,
    prob_dropout: DropoutFn | None,
) -> jax.Array:
    """`packed_chunked_attention` of q, k (B, L, H, Dh), v (B, L, H, Dv) at `tokens`, the keys
    before the first query block taken from `halo` (None: the row starts there)."""
    batch, length = q.shape[:2]
    parts = PACKED_QUERY_BLOCKS if chunk_size % PACKED_QUERY_BLOCKS == 0 else 1
    size = chunk_size // parts
    num_blocks = -(-length // size)
    pad = num_blocks * size - length

    def blocks(a: jax.Array, fill=0) -> jax.Array:  # (B, L, ·) → (B, n, S, ·)
        a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2), constant_values=fill)
        return a.reshape((batch, num_blocks, size, *a.shape[2:]))

    def band(a: jax.Array, fill=0, front: jax.Array | None = None) -> jax.Array:
        """(B, n, S, ·) → (B, n, (parts + 1)·S, ·), the `front` (B, C, ·) tokens before the
        row (`fill` without one) ahead of the first blocks."""
        if front is None:
            widths = ((0, 0), (parts, 0)) + ((0, 0),) * (a.ndim - 2)
            before = jnp.pad(a, widths, constant_values=fill)
        else:
            front = front.reshape((batch, parts, size, *front.shape[2:]))
            before = jnp.concatenate([front, a], axis=1)
        return jnp.concatenate([before[:, j : j + num_blocks] for j in range(parts + 1)], axis=2)

    def fields(t: _PackedTokens) -> tuple[jax.Array, ...]:  # run start, run chunk, index, valid
        return t.index - t.position, t.position // chunk_size, t.index, t.valid

    # Padding after L: a run of its own (queries); padding before the row: no run (keys).
    query_fills, key_fills = (-1, 0, length, False), (-2, 0, 0, False)
    run, chunk, index, valid = map(blocks, fields(tokens), query_fills)
    fronts = (None,) * 4 if halo is None else fields(halo.tokens)
    run_k, chunk_k, index_k, valid_k = map(band, (run, chunk, index, valid), key_fills, fronts)
    allowed = (
        (run_k[:, :, None, :] == run[..., None])
        & (chunk_k[:, :, None, :] == chunk[..., None])
        & (index_k[:, :, None, :] <= index[..., None])
        & valid_k[:, :, None, :]
        & valid[..., None]
    )  # (B, n, S, (parts + 1)·S)
    keys = band(blocks(k), front=None if halo is None else halo.keys)
    values = band(blocks(v), front=None if halo is None else halo.values)
    out = masked_attention(
        blocks(q), keys, values, allowed[:, :, None], compute_dtype, prob_dropout
    )
    return out.reshape((batch, num_blocks * size, *out.shape[3:]))[:, :length]


def sharded_packed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    chunk_size: int,
    segments: Segments,
    split: context_parallel.ContextSplit,
    compute_dtype=jnp.float32,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """`packed_chunked_attention` with L split as `split` says; `segments` is the run layout
    of the whole rows.

    A query's keys lie within the C − 1 row positions before it, so each shard receives the
    previous shard's last C keys and values with their run positions and validity (a halo,
    by `ContextSplit.from_previous`; shard 0 receives padding) and attends over them and its
    own. Row positions are global, so every run keeps its own chunk grid across shards.

    Args:
      q, k: (B, L, H, Dh); v: (B, L, H, Dv).
      chunk_size: C; every shard must hold at least C tokens.
      dropout_rate, dropout_key: probability dropout, from the key folded with the shard's
        index (None: no dropout).

    Returns:
      (B, L, H, Dv) in compute_dtype.

    Raises:
      ValueError: If a shard holds fewer than C tokens.
    """
    length = q.shape[1]
    if length // split.size < chunk_size:
        raise ValueError(
            f"packed rows split over a context axis need at least chunk_size = {chunk_size} "
            f"tokens per shard, got {length} tokens over {split.size} shards"
        )

    def body(q, k, v, segments: Segments, key: jax.Array | None) -> jax.Array:
        batch, shard = q.shape[:2]
        offset = jax.lax.axis_index(split.axis) * shard
        index = offset + jnp.arange(shard, dtype=jnp.int32)
        tokens = _PackedTokens(
            jnp.broadcast_to(index, (batch, shard)), segments.position, segments.valid
        )
        code = jnp.where(segments.valid, segments.position + 1, 0)  # 0: padding
        tail = (k[:, -chunk_size:], v[:, -chunk_size:], code[:, -chunk_size:])
        keys, values, code = split.from_previous(tail)
        before = jnp.broadcast_to(index[:chunk_size] - chunk_size, (batch, chunk_size))
        halo = _Halo(keys, values, _PackedTokens(before, code - 1, code > 0))
        drop = None
        if key is not None:
            drop = _keyed_dropout(dropout_rate, jax.random.fold_in(key, split.shard_index()))
        return _packed_band_attention(q, k, v, chunk_size, tokens, halo, compute_dtype, drop)

    seq = split.spec("batch", "length", None, None)
    in_specs = (seq, seq, seq, split.spec("batch", "length"))
    if dropout_key is None:
        run = split.map(lambda *a: body(*a, None), in_specs, seq)
        return run(q, k, v, segments)
    return split.map(body, (*in_specs, split.spec()), seq)(q, k, v, segments, dropout_key)


def _keyed_dropout(rate: float, key: jax.Array) -> DropoutFn:
    """Dropout at `rate` drawn from `key`, as `flax.linen.Dropout` draws it."""

    def drop(probs: jax.Array) -> jax.Array:
        keep = jax.random.bernoulli(key, 1.0 - rate, probs.shape)
        return jnp.where(keep, probs / (1.0 - rate), jnp.zeros((), probs.dtype))

    return drop


def resolve_attention_impl(impl: str) -> str:
    """The kernel an `attention_impl` setting runs: "auto" is "xla" on every platform. The
    masked softmax with its hand-written backward pass measured faster on CPU, and on an
    H200 (bf16) its train step was 5 % faster than cuDNN's fused attention, whose 32K forward
    was 6 % faster (benchmarks/RESULTS.md, "Attention kernels" and "GPU")."""
    if impl == "auto":
        return "xla"
    if impl not in ("xla", "dot_product"):
        raise ValueError(f"attention_impl must be 'auto', 'xla' or 'dot_product', got {impl!r}")
    return impl


def fused_attention_implementation(compute_dtype) -> str | None:
    """`jax.nn.dot_product_attention`'s implementation for the "dot_product" kernel: cuDNN's
    fused attention on an NVIDIA GPU in bfloat16 (its only supported dtype here; JAX's own
    default, None, is the unfused XLA version even on GPU), None (XLA) elsewhere."""
    if jax.default_backend() == "gpu" and jnp.dtype(compute_dtype) == jnp.bfloat16:
        return "cudnn"
    return None


def _dot_product_chunks(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_valid: jax.Array | None,
    chunks: Callable[[jax.Array], jax.Array],
    compute_dtype,
) -> jax.Array:
    """Causal attention within each chunk through `jax.nn.dot_product_attention`.

    q, k (B, n, C, H, Dh), v (B, n, C, H, Dv) → (B, n, C, H, Dv). Chunks fold into the batch.
    The kernel needs one head width for Q, K and V, so the narrower side is zero-padded to
    the wider (zeros add nothing to q·k, and padded value columns are sliced off). Scores
    carry no 1/sqrt(Dh) (scale 1). A chunk with no valid key outputs zeros, as the xla path.
    """
    batch, num_chunks, size, heads, dh = q.shape
    dv = v.shape[-1]
    width = max(dh, dv)

    def fold(a: jax.Array) -> jax.Array:
        a = a.astype(compute_dtype).reshape(batch * num_chunks, size, heads, a.shape[-1])
        return jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, width - a.shape[-1])))

    lengths = None
    if key_valid is not None:
        lengths = jnp.sum(chunks(key_valid.astype(jnp.int32)), axis=-1).reshape(-1)
    out = jax.nn.dot_product_attention(
        fold(q),
        fold(k),
        fold(v),
        scale=1.0,
        is_causal=True,
        key_value_seq_lengths=lengths,
        implementation=fused_attention_implementation(compute_dtype),
    )[..., :dv]
    if lengths is not None:
        out = jnp.where((lengths > 0)[:, None, None, None], out, jnp.zeros((), out.dtype))
    return out.reshape(batch, num_chunks, size, heads, dv).astype(compute_dtype)


# Rings are stored as (B·H, Dh, C) for keys and (B·H, C, Dv) for values (row b·H + h): the
# operand layouts of the one-token products, batch axes already merged. With any other
# layout XLA either copies the rings into that layout on every decode step or, because a
# reshape then sits between the slot write and the products, writes the slot twice into
# copies of the ring instead of once in place.
KEY_RING = (0, 2, 3, 1)  # token-major (B, C, H, Dh) axes → stored (B, H, Dh, C) order
VALUE_RING = (0, 2, 1, 3)  # (B, C, H, Dv) → (B, H, C, Dv)


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
        _from_ring(cache.keys, batch_size, KEY_RING),
        _from_ring(cache.values, batch_size, VALUE_RING),
    )


def ring_from_entries(keys: jax.Array, values: jax.Array) -> AttentionCache:
    """The inverse of `ring_entries`: keys (B, C, H, Dh), values (B, C, H, Dv) by slot."""
    return AttentionCache(keys=_to_ring(keys, KEY_RING), values=_to_ring(values, VALUE_RING))


def _time_ordered_ring(
    ring: jax.Array, batch: int, order: tuple[int, ...], position: jax.Array, chunk_size: int
) -> jax.Array:
    """Stored ring → (B, C, H, ·) entries ordered by time T−C … T−1 (T = position)."""
    return jnp.roll(_from_ring(ring, batch, order), -(position % chunk_size), axis=1)


def updated_ring(
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
    scores = jnp.where(jnp.arange(chunk_size) <= slot, scores, MASKED_SCORE)
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
    ring_k = _time_ordered_ring(cache.keys, batch, KEY_RING, position, c).astype(k.dtype)
    ring_v = _time_ordered_ring(cache.values, batch, VALUE_RING, position, c).astype(v.dtype)
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
        keys=updated_ring(ring_k, k, position, c, KEY_RING).astype(cache.keys.dtype),
        values=updated_ring(ring_v, v, position, c, VALUE_RING).astype(cache.values.dtype),
    )
    return out, new_cache
