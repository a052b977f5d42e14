"""CEMA over packed rows: the state reset at every run start, in blocks of timesteps (spec
§5.7). Lags inside a block are summed directly, longer ones go through the block states."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from megalodon_flax.megalodon.cema_powers import CemaCoefficients, cema_kernel, powers


@jax.custom_vjp
def _in_block_lags(kernel: jax.Array, xb: jax.Array, pos: jax.Array) -> jax.Array:
    """y[t] = Σ_{k ≤ pos[t]} K[k, d] x[t − k] within each block; kernel (T, D),
    xb (B, nb, T, D), pos (B, nb, T, 1) → (B, nb, T, D).

    The lags run in a loop, forward and backward: unrolled, XLA CPU fused the lag sum and
    the layers below it into each of their consumers and recomputed them there (3× the
    train step; optimization barriers do not survive its pipeline).
    """
    size = kernel.shape[0]
    padded = jnp.pad(xb, ((0, 0), (0, 0), (size - 1, 0), (0, 0)))

    def lag(k, y):
        shifted = jax.lax.dynamic_slice_in_dim(padded, size - 1 - k, size, axis=2)
        weight = jax.lax.dynamic_index_in_dim(kernel, k, axis=0, keepdims=False)
        return y + weight * jnp.where(pos >= k, shifted, 0.0)

    return jax.lax.fori_loop(0, size, lag, jnp.zeros_like(xb))


def _in_block_lags_fwd(kernel, xb, pos):
    return _in_block_lags(kernel, xb, pos), (kernel, xb, pos)


def _in_block_lags_bwd(residuals, g):
    kernel, xb, pos = residuals
    size = kernel.shape[0]
    padded = jnp.pad(xb, ((0, 0), (0, 0), (size - 1, 0), (0, 0)))

    def lag(k, carry):
        d_kernel, d_x = carry
        g_k = jnp.where(pos >= k, g, 0.0)
        shifted = jax.lax.dynamic_slice_in_dim(padded, size - 1 - k, size, axis=2)
        # A dot with a ones vector: XLA CPU's reduction of this product costs 2× the dot.
        products = (g_k * shifted).reshape(-1, g.shape[-1])
        row = jnp.ones(products.shape[:1], products.dtype) @ products
        d_kernel = jax.lax.dynamic_update_index_in_dim(d_kernel, row, k, axis=0)
        g_padded = jnp.pad(g_k, ((0, 0), (0, 0), (0, size - 1), (0, 0)))
        weight = jax.lax.dynamic_index_in_dim(kernel, k, axis=0, keepdims=False)
        earlier = jax.lax.dynamic_slice_in_dim(g_padded, k, size, axis=2)
        return d_kernel, d_x + weight * earlier

    zeros = (jnp.zeros_like(kernel), jnp.zeros_like(xb))
    d_kernel, d_x = jax.lax.fori_loop(0, size, lag, zeros)
    return d_kernel, d_x, None


_in_block_lags.defvjp(_in_block_lags_fwd, _in_block_lags_bwd)


# Timesteps per block of the blocked reset path: lags inside a block are summed directly,
# longer ones go through the block states (benchmarks/bench_packing.py chose it).
RESET_BLOCK = 32


def cema_blocked_resets(
    coeffs: CemaCoefficients,
    x: jax.Array,
    position: jax.Array,
    size: int = RESET_BLOCK,
    return_state: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """CEMA output with a state reset at every run start, in blocks of `size` timesteps.

    Args:
      coeffs: the layer's coefficients.
      x: (B, D, L) float32, padding already zeroed.
      position: (B, L) int32 position of each timestep within its run (0 = a reset).
      size: T, timesteps per block.
      return_state: also return the state after the last timestep.

    Returns:
      y_ema (B, D, L) float32 (no ω term): Σ_{k ≤ position[t]} K[k] x[t − k] for the
      impulse response K of `cema_kernel`; with `return_state`, also the state after the
      last timestep (B, D, N) complex64, from its run's start (or from a zero state before
      x when that run starts earlier: positions may exceed t, as in a context shard).

    Inside a block, y[t] sums K[k] x[t − k] over the lags k < T that stay in the block and in
    the run (k ≤ position[t]). Each block reduces to its end state (from its last reset, or
    its start); a scan over the blocks, which drops the incoming state of a block that holds
    a reset, gives every block's incoming state s, whose term Re Σ_n γ q^(t − b0 + 1) s
    reaches the timesteps of the block before its first reset.

    The work runs time-major, (B, L, D) with the channels minor: the caller's channel-major
    layout is a transpose of its own time-major activations, so the two transposes cancel.
    Channel-major, the block contractions need their operands transposed, and those
    transposes cost more than the contractions (benchmarks/RESULTS.md, "Packed rows").
    """
    y, state = _blocked_resets_time_major(coeffs, jnp.swapaxes(x, 1, 2), position, size)
    y = jnp.swapaxes(y, 1, 2)
    return (y, jnp.swapaxes(state, 1, 2)) if return_state else y


def _blocked_resets_time_major(
    coeffs: CemaCoefficients, x: jax.Array, position: jax.Array, size: int
) -> tuple[jax.Array, jax.Array]:
    """`cema_blocked_resets` on x (B, L, D): y (B, L, D) and the final state (B, N, D)."""
    batch, length, dim = x.shape
    blocks = -(-length // size)
    pad = blocks * size - length
    # Zeros in front (not behind) keep the last block's end state the final state.
    xb = jnp.pad(x, ((0, 0), (pad, 0), (0, 0))).reshape(batch, blocks, size, dim)
    pos = jnp.pad(position, ((0, 0), (pad, 0))).reshape(batch, blocks, size, 1)
    offset = jnp.arange(size, dtype=jnp.int32)[:, None]  # t − b0, (T, 1)

    # q^j for j ≤ T, straight from the polar form (T is small): (T + 1, N, D) each.
    pow_re, pow_im = powers(coeffs, jnp.arange(size + 1, dtype=jnp.float32))
    pow_re, pow_im = jnp.transpose(pow_re, (2, 1, 0)), jnp.transpose(pow_im, (2, 1, 0))
    y = _in_block_lags(cema_kernel(coeffs, size).T, xb, pos)

    # The end state of each block from its last reset (earlier inputs drop out):
    # p Σ_k q^(T − 1 − k) x[b0 + k], as Re/Im parts (B, nb, N, D).
    end = pos[:, :, -1:]  # (B, nb, 1, 1)
    kept = jnp.where(size - 1 - offset <= end, xb, 0.0)
    p = coeffs.p.T
    rev = jnp.concatenate([pow_re[size - 1 :: -1], pow_im[size - 1 :: -1]], axis=1)
    local = jnp.einsum("bmkd,knd->bmnd", kept, rev)
    n = p.shape[0]
    local_re, local_im = p * local[:, :, :n], p * local[:, :, n:]
    decay_re, decay_im = pow_re[size], pow_im[size]  # q^T (N, D)
    carries = jnp.moveaxis(end[:, :, 0] >= size, 1, 0)[..., None]  # (nb, B, 1, 1)

    def step(state, block):
        # Real and imaginary parts kept apart: complex arithmetic is slow on XLA CPU.
        s_re, s_im = state
        l_re, l_im, carry = block
        n_re = jnp.where(carry, decay_re * s_re - decay_im * s_im, 0.0) + l_re
        n_im = jnp.where(carry, decay_re * s_im + decay_im * s_re, 0.0) + l_im
        return (n_re, n_im), state

    # Zeros derived from the inputs: in a context shard they are per-shard values too.
    zeros = jnp.zeros_like(local_re[:, 0])
    blocks_first = (jnp.moveaxis(local_re, 1, 0), jnp.moveaxis(local_im, 1, 0), carries)
    (last_re, last_im), (in_re, in_im) = jax.lax.scan(step, (zeros, zeros), blocks_first)
    in_re, in_im = jnp.moveaxis(in_re, 0, 1), jnp.moveaxis(in_im, 0, 1)
    # Re Σ_n γ s q^(offset + 1) for the incoming state s of each block.
    g_re, g_im = coeffs.gamma_re.T, coeffs.gamma_im.T
    gs_re = g_re * in_re - g_im * in_im
    gs_im = g_re * in_im + g_im * in_re
    bias = jnp.einsum(
        "bmnd,tnd->bmtd",
        jnp.concatenate([gs_re, -gs_im], axis=2),
        jnp.concatenate([pow_re[1:], pow_im[1:]], axis=1),
    )
    y = y + jnp.where(pos > offset, bias, 0.0)
    y = y.reshape(batch, blocks * size, dim)[:, pad:]
    return y, jax.lax.complex(last_re, last_im)
