"""TimestepNorm: causal, streaming group normalization over time (spec §4).

The D features form G groups of gs = D/G. At time t each group is normalized with the mean
and population variance of every scalar of that group seen so far (inclusive), including
what an incoming state summarizes. Per-timestep summaries (count, mean, M2) are summed
within blocks relative to the block's mean, and the block totals are merged in order with
Chan's formula (`_running_summaries`), never from uncentered cumulative sums over the whole
call. Everything runs in float32; masked timesteps output exactly 0 and leave the
statistics untouched.

Split over a `context` mesh axis (`context_parallel`), each shard reduces its timesteps to one
summary (count, mean, M2) per row and group; the summaries of the shards before it, merged in
order with Chan's formula, are the shard's incoming state. Over packed rows a shard's summary
counts from its last run start and is flagged when it holds one; a flagged summary discards
what came before it (`norm_summaries`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from megalodon_flax.layers import initializers
from megalodon_flax.layers.segments import Segments
from megalodon_flax.megalodon import context_parallel
from megalodon_flax.megalodon.norm_summaries import (
    SUMMARY_BLOCK,
    Summary,
    blocked_cumsum,
    chan_merge,
    from_blocks,
    group_summary,
    packed_shard_summary,
    packed_statistics,
    segmented_merge,
    shard_summary,
    to_blocks,
)

# The count is kept in two int32 limbs of COUNT_LIMB: exact up to 2^61 timesteps.
COUNT_LIMB = 1 << 30


@struct.dataclass
class NormState:
    """Streaming statistics per row and group.

    count: (B,) int32, valid timesteps absorbed modulo 2^30, and count_high (B,) int32 the
    multiples of 2^30 (`num_absorbed` = count_high·2^30 + count never overflows).
    mean: (B, G) float32 running mean, with mean_c (B, G) its compensation: the mean is
    mean + mean_c, so that a long stream's small updates are not rounded away.
    var, var_c: the running population variance the same way (1 while nothing is absorbed).
    """

    count: jax.Array
    count_high: jax.Array
    mean: jax.Array
    mean_c: jax.Array
    var: jax.Array
    var_c: jax.Array

    @classmethod
    def fresh(cls, batch_size: int, num_groups: int) -> NormState:
        zeros = jnp.zeros((batch_size, num_groups), jnp.float32)
        return cls(
            count=jnp.zeros((batch_size,), jnp.int32),
            count_high=jnp.zeros((batch_size,), jnp.int32),
            mean=zeros,
            mean_c=zeros,
            var=jnp.ones((batch_size, num_groups), jnp.float32),
            var_c=zeros,
        )

    @classmethod
    def uncompensated(cls, count: jax.Array, mean: jax.Array, var: jax.Array) -> NormState:
        """A state of `count` (B,) int timesteps (< 2^31), mean and var (B, G) float32."""
        count = count.astype(jnp.int32)
        high = count // COUNT_LIMB
        zeros = jnp.zeros_like(mean, jnp.float32)
        return cls(count - high * COUNT_LIMB, high, mean, zeros, var, zeros)

    @property
    def num_absorbed(self) -> jax.Array:
        """(B,) float32 count of absorbed timesteps (exact below 2^24)."""
        return self.count_high.astype(jnp.float32) * COUNT_LIMB + self.count.astype(jnp.float32)

    @property
    def has_absorbed(self) -> jax.Array:
        """(B,) bool: whether any timestep was absorbed."""
        return (self.count > 0) | (self.count_high > 0)

    def counted(self, added: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(count, count_high) after `added` (B,) int32 more timesteps (each call < 2^30)."""
        total = self.count + added
        carry = total // COUNT_LIMB
        return total - carry * COUNT_LIMB, self.count_high + carry


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(s, e) with s = fl(a + b) and s + e = a + b exactly (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


# Calls at least this long hide their all-valid mask from XLA's constant folding.
OPAQUE_MASK_FROM = 1 << 14


def _running_summaries(
    elems: tuple[jax.Array, jax.Array, jax.Array],
    incoming: tuple[jax.Array, jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Inclusive running merge of per-timestep summaries after an incoming one.

    Args:
      elems: (n, mean, M2) each (B, L, G): timestep t's count (0 or 1), mean and M2.
      incoming: (n, mean, M2) each (B, G), merged before timestep 0.

    Returns:
      n, mean, M2 (B, L, G) of incoming ∪ timesteps 0..t, and the count of timesteps 0..t
      alone (B, L, G).

    Inside a block of `SUMMARY_BLOCK` timesteps the sums run relative to the block's own
    mean (so no offset enters them): N = Σn, S = Σn·d, Q = Σ(M2 + n·d²) with d = mean − the
    block mean, giving mean = block mean + S/N and M2 = Q − S²/N. Block totals are merged
    into the carried summary with Chan's formula in a loop over the L/SUMMARY_BLOCK blocks.
    """
    length = elems[0].shape[1]
    n, mu, m2 = (to_blocks(a, min(SUMMARY_BLOCK, length)) for a in elems)
    count = jnp.sum(n, axis=2, keepdims=True)
    center = jnp.sum(n * mu, axis=2, keepdims=True) / jnp.where(count > 0, count, 1.0)
    d = jnp.where(n > 0, mu - center, 0.0)
    cum_n = jnp.cumsum(n, axis=2)
    cum_s = jnp.cumsum(n * d, axis=2)
    cum_q = jnp.cumsum(m2 + n * d * d, axis=2)
    safe = jnp.where(cum_n > 0, cum_n, 1.0)
    local = (cum_n, center + cum_s / safe, cum_q - cum_s * cum_s / safe)
    totals = tuple(a[:, :, -1] for a in local)  # (nb, B, G)

    def step(carry, block_total):
        merged = chan_merge(carry, block_total)
        return merged, carry

    _, before = jax.lax.scan(step, incoming, totals)  # summary before each block
    before = tuple(a[:, :, None] for a in before)
    n_tot, mean, m2_tot = chan_merge(before, local)

    n_call = from_blocks(local[0] + (jnp.cumsum(count, axis=0) - count), length)
    return (*(from_blocks(a, length) for a in (n_tot, mean, m2_tot)), n_call)


def _anchored_statistics(
    x: jax.Array, num_groups: int, state: NormState, mask: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, NormState]:
    """Block-Welford statistics computed relative to a per-(row, group) anchor.

    The anchor is the incoming mean (or, for a fresh row, the first valid block mean of the
    call), so that a large common offset never enters the float32 sums.

    Returns:
      xg (B, L, G, gs) = x − anchor, anchor (B, 1, G), mean − anchor (B, L, G), var (B, L, G)
      and the state after the last timestep.
    """
    batch, length, dim = x.shape
    xg = x.astype(jnp.float32).reshape(batch, length, num_groups, dim // num_groups)
    if mask is None:
        valid = jnp.ones((batch, length), bool)
        if length >= OPAQUE_MASK_FROM or jax.default_backend() != "cpu":
            # XLA's constant folding evaluates the prefix counts of an all-valid mask element
            # by element: 0.4 s of the 32K forward's compile on CPU, and on an H200 4.7 s of
            # the 16 × 512 train step's (XLA's slow-folding alarms). Only on CPU below this
            # length does folding cost less than what it simplifies saves (0.2 s at 512).
            valid = jax.lax.optimization_barrier(valid)
    else:
        valid = mask.astype(bool)
    v = valid[..., None]

    first = jnp.argmax(valid, axis=1)[:, None, None]
    first_mean = jnp.take_along_axis(jnp.mean(xg, axis=-1), first, axis=1)
    any_valid = jnp.any(valid, axis=1)[:, None, None]
    fresh_anchor = jnp.where(any_valid & jnp.isfinite(first_mean), first_mean, 0.0)
    has_state = state.has_absorbed[:, None, None]
    # The normalized output does not depend on the anchor, so no gradient flows through it.
    anchor = jax.lax.stop_gradient(jnp.where(has_state, state.mean[:, None, :], fresh_anchor))
    xg = xg - anchor[..., None]

    blk_mean = jnp.mean(xg, axis=-1)
    blk_var = jnp.mean(jnp.square(xg - blk_mean[..., None]), axis=-1)
    n = jnp.broadcast_to(v.astype(jnp.float32), blk_mean.shape)
    elems = (n, jnp.where(v, blk_mean, 0.0), jnp.where(v, blk_var, 0.0))
    c0 = state.num_absorbed[:, None]
    incoming = (c0 * jnp.ones_like(state.mean), state.mean - anchor[:, 0], c0 * state.var)
    n_tot, mean, m2, n_call = _running_summaries(elems, incoming)
    # Before the first valid step of the call the incoming variance is kept bit-exact.
    var = jnp.where(n_call > 0, m2 / jnp.where(n_tot > 0, n_tot, 1.0), state.var[:, None, :])
    call = group_summary(blk_mean, blk_var, valid)
    new_state = _absorbed(state, anchor[:, 0], call, jnp.sum(valid, axis=1, dtype=jnp.int32))
    return xg, anchor, mean, var, new_state


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def fresh_normalized(
    x: jax.Array, mask: jax.Array | None, num_groups: int, eps: float
) -> jax.Array:
    """(x − mean_t)·rsqrt(var_t + eps) of a call from a fresh state, with a hand-written VJP.

    Args:
      x: (B, L, D) float32.
      mask: (B, L) bool or None (all valid).

    Returns:
      (B, L, G, gs) float32, the same values as the statistics of `_anchored_statistics`.

    The statistics are those of every scalar of the group up to t, so their gradient has a
    closed form: with N_t = gs·(valid steps ≤ t), ∂mean_t/∂x_sj = 1/N_t and ∂var_t/∂x_sj =
    2(x_sj − mean_t)/N_t for valid s ≤ t. The backward pass is then two reverse cumulative
    sums instead of the transpose of the blocked merges (a third of the train step's compiled
    kernels went to that).
    """
    return _fresh_forward(x, mask, num_groups, eps)[0]


def _fresh_forward(
    x: jax.Array, mask: jax.Array | None, num_groups: int, eps: float
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    state = NormState.fresh(x.shape[0], num_groups)
    xg, _, mean, var, _ = _anchored_statistics(x, num_groups, state, mask)
    rstd = jax.lax.rsqrt(var + eps)
    return (xg - mean[..., None]) * rstd[..., None], (xg, mean, rstd, mask)


def _fresh_backward(
    num_groups: int, eps: float, residuals: tuple[jax.Array, ...], gy: jax.Array
) -> tuple[jax.Array, None]:
    del num_groups, eps
    xg, mean, rstd, mask = residuals
    batch, length, groups, size = xg.shape
    if mask is None:
        valid = jnp.ones((batch, length, 1), jnp.float32)
    else:
        valid = mask.astype(jnp.float32)[..., None]
    g_mean = -rstd * jnp.sum(gy, axis=-1)  # (B, L, G)
    g_var = -0.5 * rstd**3 * jnp.sum(gy * (xg - mean[..., None]), axis=-1)
    scalars = size * blocked_cumsum(valid)  # N_t, (B, L, 1)
    inv = jnp.where(scalars > 0, 1.0 / jnp.where(scalars > 0, scalars, 1.0), 0.0)
    per_x = 2.0 * g_var * inv
    shared = g_mean * inv - per_x * mean
    after_shared = blocked_cumsum(shared, reverse=True)
    after_per_x = blocked_cumsum(per_x, reverse=True)
    through_stats = valid[..., None] * (after_shared[..., None] + xg * after_per_x[..., None])
    gx = gy * rstd[..., None] + through_stats
    return gx.reshape(batch, length, groups * size), None


fresh_normalized.defvjp(_fresh_forward, _fresh_backward)


def _absorbed(state: NormState, anchor: jax.Array, call: Summary, added: jax.Array) -> NormState:
    """`state` after a call whose summary `call` (count, mean − anchor, M2) each (B, G) counts
    `added` (B,) timesteps; `anchor` (B, G) is `state.mean` when the state absorbed any.

    The updates of the mean and variance are formed from differences (never from the
    rounded totals) and added to the compensated pairs with TwoSum, so after 10^8 timesteps an
    update of 1e-7 of the mean still counts.
    """
    n1, m1, big_m1 = call
    n0 = state.num_absorbed[:, None]
    has0 = jnp.broadcast_to(state.has_absorbed[:, None], m1.shape)
    n = n0 + n1
    safe = jnp.where(n > 0, n, 1.0)
    r0 = jnp.where(has0, state.mean_c, 0.0)  # the state's mean − anchor
    delta = m1 - r0
    mean, mean_c = _two_sum(anchor, r0 + delta * (n1 / safe))
    v0, v0_c = jnp.where(has0, state.var, 0.0), jnp.where(has0, state.var_c, 0.0)
    update = (big_m1 - n1 * v0 - n1 * v0_c + delta * delta * (n0 * (n1 / safe))) / safe
    var, var_c = _two_sum(v0, v0_c + update)
    took = n1 > 0  # a call of padding only keeps the state bit-exact
    count, count_high = state.counted(added)
    return NormState(
        count=count,
        count_high=count_high,
        mean=jnp.where(took, mean, state.mean),
        mean_c=jnp.where(took, mean_c, state.mean_c),
        var=jnp.where(took, var, state.var),
        var_c=jnp.where(took, var_c, state.var_c),
    )


def state_from_summary(summary: Summary) -> NormState:
    """The `NormState` after the timesteps a summary describes (fresh when it counts none)."""
    count, mean, m2 = summary
    has = count > 0
    return NormState.uncompensated(
        count[:, 0].astype(jnp.int32),
        jnp.where(has, mean, 0.0),
        jnp.where(has, m2 / jnp.where(has, count, 1.0), 1.0),
    )


def sharded_normalize(
    x: jax.Array,
    num_groups: int,
    mask: jax.Array | None,
    eps: float,
    split: context_parallel.ContextSplit,
) -> tuple[jax.Array, NormState]:
    """Normalizes x (B, L, D) from a fresh state with L split as `split` says.

    Returns:
      (x − mean)·rsqrt(var + eps) as (B, L, D) float32 (no affine), and the state after the
      whole sequence.
    """
    dim = x.shape[-1]

    def body(x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, NormState]:
        summary = shard_summary(x, num_groups, mask)
        empty = tuple(jnp.zeros(a.shape, a.dtype) for a in summary)  # the same on every shard
        before, total = split.exclusive_fold(split.gather(summary), chan_merge, empty)
        xg, _, mean, var, _ = _anchored_statistics(x, num_groups, state_from_summary(before), mask)
        y = (xg - mean[..., None]) * jax.lax.rsqrt(var[..., None] + eps)
        return y.reshape(*x.shape[:2], dim), state_from_summary(total)

    seq = split.spec("batch", "length", None)
    out_specs = (seq, split.spec("batch"))
    if mask is None:
        return split.map(lambda a: body(a, None), (seq,), out_specs)(x)
    return split.map(body, (seq, split.spec("batch", "length")), out_specs)(x, mask)


def sharded_packed_normalize(
    x: jax.Array,
    num_groups: int,
    segments: Segments,
    eps: float,
    split: context_parallel.ContextSplit,
) -> jax.Array:
    """Normalizes packed rows x (B, L, D) with L split as `split` says; `segments` is the run
    layout of the whole rows (positions count from each run's start, wherever it lies).

    Each shard reduces to its `packed_shard_summary`; the flagged merge of the summaries of
    the shards before it is the state of the run that its first timesteps continue (dropped
    past a run start), which `packed_statistics` merges before them.

    Returns:
      (x − mean)·rsqrt(var + eps) as (B, L, D) float32 (no affine, padding not zeroed).
    """
    dim = x.shape[-1]

    def body(x: jax.Array, segments: Segments) -> jax.Array:
        summary = packed_shard_summary(x, num_groups, segments)
        empty = tuple(jnp.zeros(a.shape, a.dtype) for a in summary)  # the same on every shard
        before, _ = split.exclusive_fold(split.gather(summary), segmented_merge, empty)
        xg, mean, var = packed_statistics(x, num_groups, segments, before[1:])
        y = (xg - mean[..., None]) * jax.lax.rsqrt(var[..., None] + eps)
        return y.reshape(*x.shape[:2], dim)

    seq = split.spec("batch", "length", None)
    return split.map(body, (seq, split.spec("batch", "length")), seq)(x, segments)


def timestep_norm_statistics(
    x: jax.Array, num_groups: int, state: NormState, mask: jax.Array | None
) -> tuple[jax.Array, jax.Array, NormState]:
    """Running mean and variance used at every timestep (upstream block-Welford semantics).

    Args:
      x: (B, L, D) input.
      num_groups: G.
      state: incoming statistics.
      mask: (B, L) bool, True for valid timesteps, or None.

    Returns:
      mean (B, L, G), var (B, L, G) float32, and the state after the last timestep.
    """
    _, anchor, mean, var, new_state = _anchored_statistics(x, num_groups, state, mask)
    return anchor + mean, var, new_state


def timestep_norm_statistics_hf(
    x: jax.Array, num_groups: int, state: NormState, mask: jax.Array | None
) -> tuple[jax.Array, jax.Array, NormState]:
    """megalodon-hf's statistics (spec §4.6): between-timestep variance of group means only.

    Same shapes as `timestep_norm_statistics`. Includes HF's prior-variance term, its 1e-6
    variance floor, and the cumulative-sum formulation it uses.
    """
    batch, length, dim = x.shape
    xg = x.astype(jnp.float32).reshape(batch, length, num_groups, dim // num_groups)
    valid = jnp.ones((batch, length), bool) if mask is None else mask.astype(bool)
    w = valid[..., None].astype(jnp.float32)
    gm = jnp.where(valid[..., None], jnp.mean(xg, axis=-1), 0.0)
    c0 = state.num_absorbed[:, None, None]
    m0 = state.mean[:, None, :]
    v0 = state.var[:, None, :]
    count = c0 + jnp.cumsum(w, axis=1)
    safe_count = jnp.maximum(count, 1.0)
    mean = jnp.where(count > 0, (c0 * m0 + jnp.cumsum(w * gm, axis=1)) / safe_count, m0)
    prev_mean = jnp.concatenate([m0, mean[:, :-1]], axis=1)
    m2 = v0 * jnp.maximum(c0, 1.0) + jnp.cumsum(w * (gm - prev_mean) * (gm - mean), axis=1)
    var = jnp.where(count > 0, m2 / safe_count, v0)
    var = jnp.maximum(var, 1e-6)
    count, count_high = state.counted(jnp.sum(valid, axis=1, dtype=jnp.int32))
    zeros = jnp.zeros_like(state.mean)
    new_state = NormState(count, count_high, mean[:, -1], zeros, var[:, -1], zeros)
    return mean, var, new_state


class TimestepNorm(nn.Module):
    """Streaming group normalization with stored+1 affine parameters `weight`, `bias` (D,).

    Attributes:
      num_groups: G.
      eps: added to the variance inside the rsqrt.
      variant: "upstream" (block Welford) or "hf" (megalodon-hf's formula).
    """

    num_groups: int
    eps: float = 1e-5
    variant: str = "upstream"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        state: NormState | None = None,
        mask: jax.Array | None = None,
        split: context_parallel.ContextSplit | None = None,
        segments: Segments | None = None,
    ) -> tuple[jax.Array, NormState | None]:
        """x (B, L, D) → (y (B, L, D) in x's dtype, state after the call).

        `split` (from `context_parallel.active_split`) splits L over a mesh axis; the call
        then starts from a fresh state. `segments` (packed rows, the run layout of the whole
        rows) restarts the statistics at every run start and zeroes the padding outputs; such
        a call starts fresh, needs variant='upstream' and returns no state.
        """
        batch, length, dim = x.shape
        weight = self.param(
            "weight", nn.with_logical_partitioning(initializers.zeros, ("embed",)), (dim,)
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(initializers.zeros, ("embed",)), (dim,)
        )
        if segments is not None:
            if state is not None or self.variant != "upstream":
                raise ValueError(
                    "a TimestepNorm over packed rows (segments) starts from a fresh state and "
                    f"needs variant='upstream' (got variant={self.variant!r})"
                )
            if split is None:
                xg, mean, var = packed_statistics(x, self.num_groups, segments)
                y = (xg - mean[..., None]) * jax.lax.rsqrt(var[..., None] + self.eps)
            else:
                y = sharded_packed_normalize(x, self.num_groups, segments, self.eps, split)
            mask, new_state = segments.valid, None
        elif split is not None:
            if state is not None or self.variant != "upstream":
                raise ValueError(
                    "a TimestepNorm split over a context axis starts from a fresh state and "
                    f"needs variant='upstream' (got variant={self.variant!r}, "
                    f"state {'given' if state is not None else 'None'})"
                )
            y, new_state = sharded_normalize(x, self.num_groups, mask, self.eps, split)
        else:
            fresh = state is None
            if fresh:
                state = NormState.fresh(batch, self.num_groups)
            if self.variant == "upstream":
                xg, _, mean, var, new_state = _anchored_statistics(x, self.num_groups, state, mask)
            else:
                mean, var, new_state = timestep_norm_statistics_hf(x, self.num_groups, state, mask)
                xg = x.astype(jnp.float32).reshape(batch, length, self.num_groups, -1)
            if fresh and self.variant == "upstream":
                # The same values; XLA merges the two forward computations.
                xf = x.astype(jnp.float32)
                y = fresh_normalized(xf, mask, self.num_groups, self.eps)
            else:
                y = (xg - mean[..., None]) * jax.lax.rsqrt(var[..., None] + self.eps)
        y = y.reshape(batch, length, dim) * (1.0 + weight) + bias
        if mask is not None and self.variant == "upstream":
            y = jnp.where(mask[..., None], y, 0.0)
        return y.astype(x.dtype), new_state
