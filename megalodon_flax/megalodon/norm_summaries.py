"""Summaries (count, mean, M2) of TimestepNorm's group statistics and their merges (spec §4.4).

A timestep contributes, per row and group, the summary (1, m_t, v_t) of its group mean and
within-group variance. Summaries merge with Chan's formula; over packed rows a summary also
carries a flag "holds a run start", and a flagged right side discards the left side
(`segmented_merge`). `timestep_norm` builds the running statistics from these, and its
context-parallel functions reduce each shard to one summary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from megalodon_flax.layers.segments import Segments

# (count, mean, M2) per row and group, each (B, G) float32.
Summary = tuple[jax.Array, jax.Array, jax.Array]
# (reset, count, mean, M2): a summary of packed rows and whether it holds a run start (bool).
PackedSummary = tuple[jax.Array, jax.Array, jax.Array, jax.Array]

# Timesteps per block of the running summaries: prefix sums inside a block, Chan merges of
# whole blocks in a sequential loop. Both compile to a handful of ops (a parallel prefix over
# all L timesteps unrolls into O(log L) stages of slices and merges, and compiled 10× slower).
SUMMARY_BLOCK = 128


def chan_merge(left: Summary, right: Summary) -> Summary:
    """Merges summaries (n, mean, M2); an empty side returns the other side exactly."""
    n_l, mu_l, m2_l = left
    n_r, mu_r, m2_r = right
    n = n_l + n_r
    safe_n = jnp.where(n > 0, n, 1.0)
    delta = mu_r - mu_l
    mu = mu_l + delta * (n_r / safe_n)
    m2 = m2_l + m2_r + delta * delta * (n_l * n_r / safe_n)
    mu = jnp.where(n_l == 0, mu_r, jnp.where(n_r == 0, mu_l, mu))
    m2 = jnp.where(n_l == 0, m2_r, jnp.where(n_r == 0, m2_l, m2))
    return n, mu, m2


def segmented_merge(left: PackedSummary, right: PackedSummary) -> PackedSummary:
    """Merges (reset, n, mean, M2) summaries in time order: a right side that holds a run
    start discards the left side."""
    reset_l, *sum_l = left
    reset_r, *sum_r = right
    merged = chan_merge(tuple(sum_l), tuple(sum_r))
    kept = (jnp.where(reset_r, r, m) for r, m in zip(sum_r, merged, strict=True))
    return (reset_l | reset_r, *kept)


def to_blocks(a: jax.Array, size: int) -> jax.Array:
    """(B, L, G) → (nb, B, S, G): L zero-padded to blocks of `size` timesteps."""
    batch, length, groups = a.shape
    blocks = -(-length // size)
    a = jnp.pad(a, ((0, 0), (0, blocks * size - length), (0, 0)))
    return a.reshape(batch, blocks, size, groups).transpose(1, 0, 2, 3)


def from_blocks(a: jax.Array, length: int) -> jax.Array:
    """(nb, B, S, G) → (B, L, G), the padding dropped."""
    blocks, batch, size, groups = a.shape
    return a.transpose(1, 0, 2, 3).reshape(batch, blocks * size, groups)[:, :length]


def blocked_cumsum(a: jax.Array, reverse: bool = False) -> jax.Array:
    """Inclusive cumulative sum of a (B, L, G) over L (from the end when `reverse`): prefix
    sums inside blocks of `SUMMARY_BLOCK` plus the totals of the blocks before (after) each."""
    length = a.shape[1]
    blocks = to_blocks(a, min(SUMMARY_BLOCK, length))
    inner = jax.lax.cumsum(blocks, axis=2, reverse=reverse)
    totals = inner[:, :, 0 if reverse else -1]  # (nb, B, G)
    outer = jax.lax.cumsum(totals, axis=0, reverse=reverse) - totals
    return from_blocks(inner + outer[:, :, None], length)


def group_summary(blk_mean: jax.Array, blk_var: jax.Array, valid: jax.Array) -> Summary:
    """(count, mean, M2) each (B, G) of per-timestep group means and variances (B, L, G)
    over the `valid` (B, L) timesteps."""
    v = valid[..., None]
    count = jnp.broadcast_to(jnp.sum(v, axis=1, dtype=jnp.float32), blk_mean[:, 0].shape)
    safe = jnp.where(count > 0, count, 1.0)
    mean = jnp.sum(jnp.where(v, blk_mean, 0.0), axis=1) / safe
    dev = jnp.square(blk_mean - mean[:, None])
    m2 = jnp.sum(jnp.where(v, blk_var + dev, 0.0), axis=1)
    return count, mean, m2


def shard_summary(x: jax.Array, num_groups: int, mask: jax.Array | None) -> Summary:
    """(count, mean, M2) of the valid timesteps of x (B, L, D): each (B, G) float32.

    A timestep counts once per group with its group mean and within-group variance, as in
    the running statistics; M2 sums those variances and the squared deviations of the group
    means from the summary's mean (two passes, no uncentered sums).
    """
    batch, length, dim = x.shape
    xg = x.astype(jnp.float32).reshape(batch, length, num_groups, dim // num_groups)
    valid = jnp.ones((batch, length), bool) if mask is None else mask.astype(bool)
    blk_mean = jnp.mean(xg, axis=-1)
    blk_var = jnp.mean(jnp.square(xg - blk_mean[..., None]), axis=-1)
    return group_summary(blk_mean, blk_var, valid)


def packed_shard_summary(x: jax.Array, num_groups: int, segments: Segments) -> PackedSummary:
    """The summary of a context shard x (B, L, D) of packed rows, `segments` its slice of the
    rows' run layout (positions count from runs that may begin in an earlier shard).

    Returns:
      reset (B, 1) bool, whether the shard holds a run start, and (count, mean, M2) each
      (B, G) of its valid timesteps from its last run start (all of them when it holds none).
    """
    run_start = segments.run_start  # shard-local: negative for a run from an earlier shard
    last_run = run_start == run_start[:, -1:]
    count, mean, m2 = shard_summary(x, num_groups, segments.valid & last_run)
    return run_start[:, -1:] >= 0, count, mean, m2


def packed_statistics(
    x: jax.Array, num_groups: int, segments: Segments, incoming: Summary | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Running statistics that restart at every run start of packed rows (spec §4.5).

    Each run is anchored at its first timestep's group mean. Summaries are merged with
    Chan's formula (a run start discards what came before) by a loop over the timesteps of
    blocks of `SUMMARY_BLOCK`, all blocks at once, and a loop over the block totals.

    Args:
      x: (B, L, D).
      num_groups: G.
      segments: the run layout of x.
      incoming: (count, mean, M2) each (B, G) of the run that x's first timesteps continue
        (a context shard whose first run began in an earlier shard; positions then exceed
        the timestep index), or None. It reaches the timesteps before x's first run start,
        which are anchored at x's first timestep.

    Returns:
      xg (B, L, G, gs) = x − anchor, mean − anchor (B, L, G) and var (B, L, G) float32 (1
      where the run has no valid timestep yet).
    """
    batch, length, dim = x.shape
    xg = x.astype(jnp.float32).reshape(batch, length, num_groups, dim // num_groups)
    blk_mean = jnp.mean(xg, axis=-1)
    run_start = segments.run_start if incoming is None else jnp.maximum(segments.run_start, 0)
    first = jnp.take_along_axis(blk_mean, run_start[..., None], axis=1)
    anchor = jax.lax.stop_gradient(jnp.where(jnp.isfinite(first), first, 0.0))
    xg = xg - anchor[..., None]
    blk_mean = blk_mean - anchor
    blk_var = jnp.mean(jnp.square(xg - blk_mean[..., None]), axis=-1)
    v = segments.valid[..., None]
    n = jnp.broadcast_to(v.astype(jnp.float32), blk_mean.shape)
    reset = jnp.broadcast_to(segments.starts[..., None], blk_mean.shape)
    elems = (reset, n, jnp.where(v, blk_mean, 0.0), jnp.where(v, blk_var, 0.0))

    def running(carry, step_elems):
        merged = segmented_merge(carry, step_elems)
        return merged, merged

    # A loop over the timesteps of a block, all blocks at once: `lax.associative_scan` here
    # compiled for 14 s per TimestepNorm on CPU.
    size = min(SUMMARY_BLOCK, length)
    by_step = tuple(jnp.moveaxis(to_blocks(a, size), 2, 0) for a in elems)  # (S, nb, B, G)
    start = tuple(jnp.zeros_like(a[0]) for a in by_step)
    _, local = jax.lax.scan(running, start, by_step)
    local = tuple(jnp.moveaxis(a, 0, 2) for a in local)  # (nb, B, S, G)
    totals = tuple(a[:, :, -1] for a in local)

    def step(carry, block_total):
        return segmented_merge(carry, block_total), carry

    first_carry = tuple(jnp.zeros_like(a[0]) for a in totals)
    if incoming is not None:
        count_in, mean_in, m2_in = incoming
        first_carry = (first_carry[0], count_in, mean_in - anchor[:, 0], m2_in)
    _, before = jax.lax.scan(step, first_carry, totals)
    before = tuple(a[:, :, None] for a in before)
    _, count, mean, m2 = segmented_merge(before, local)

    count, mean, m2 = (from_blocks(a, length) for a in (count, mean, m2))
    var = jnp.where(count > 0, m2 / jnp.where(count > 0, count, 1.0), 1.0)
    return xg, mean, var
