"""CEMA: the complex exponential moving average of Megalodon (spec §3).

For x (B, D, L) real and state h (B, D, N) complex:

    h[t] = q ⊙ h[t-1] + p ⊙ x[t]        y[t] = Re(Σ_n γ h[t]) + ω ⊙ x[t]

with p = σ(alpha) real, q = (1 − σ(alpha)σ(delta))·exp(i·n·θ) and γ = (γ_r + iγ_i)/√N.
Three interchangeable algorithms compute y (and the final state):

* `fft`: y = causal convolution of x with the kernel K[d, j] = Re Σ_n p γ q^j, by real FFTs;
  an incoming state adds the bias Re Σ_n γ q^(t+1) h_init, and the final state has a
  closed form. Powers q^j are built in polar form in blocks of lags, each block factored
  as q^(a·S + s) = q^(a·S)·q^s so that only ~2√K powers per channel need transcendentals.
* `scan`: `lax.associative_scan` over the affine maps h ↦ q·h + p·x[t].
* `sequential`: `lax.scan` over time (cheap for short streaming calls).

All CEMA math runs in float32 / complex64 whatever the input dtype; the output is cast back.

Split over a `context` mesh axis (`context_parallel`), each shard runs its path from a zero
state and reduces to its final state h_j; shard i's incoming state is
Σ_{j<i} q^(S·(i−1−j)) h_j for shards of S steps, and its output gains that state's bias term.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from megalodon_flax.layers.segments import Segments
from megalodon_flax.megalodon import context_parallel

# Smallest |q| used inside log(): keeps j·log|q| finite when σ saturates to |q| = 0.
_TINY_MAGNITUDE = 1e-30


class CemaCoefficients(NamedTuple):
    """Derived per-channel coefficients, all float32 of shape (D, N).

    p: real input gain. log_mag: log|q|. phase: arg q. gamma_re / gamma_im: γ = γ_r + iγ_i,
    already scaled by N^(-1/2).
    """

    p: jax.Array
    log_mag: jax.Array
    phase: jax.Array
    gamma_re: jax.Array
    gamma_im: jax.Array

    @property
    def q(self) -> jax.Array:
        """Complex decay q (D, N), complex64."""
        return jnp.exp(self.log_mag) * jax.lax.complex(jnp.cos(self.phase), jnp.sin(self.phase))

    @property
    def gamma(self) -> jax.Array:
        return jax.lax.complex(self.gamma_re, self.gamma_im)


def cema_coefficients(
    alpha: jax.Array,
    delta: jax.Array,
    theta: jax.Array,
    gamma_real: jax.Array,
    gamma_imag: jax.Array,
) -> CemaCoefficients:
    """Maps the raw parameters (alpha, delta (D,N,1); theta (D,1,1); gamma_* (D,N)) to p, q, γ."""
    ndim = alpha.shape[1]
    a = jax.nn.sigmoid(alpha[..., 0].astype(jnp.float32))
    d = jax.nn.sigmoid(delta[..., 0].astype(jnp.float32))
    mag = jnp.clip(1.0 - a * d, 0.0, 1.0)
    log_mag = jnp.log(jnp.maximum(mag, _TINY_MAGNITUDE))
    base_angle = jax.nn.sigmoid(theta[:, 0, :].astype(jnp.float32)) * (2.0 * math.pi / ndim)
    wavelets = jnp.arange(1, ndim + 1, dtype=jnp.float32)
    phase = base_angle * wavelets  # (D, N)
    scale = 1.0 / math.sqrt(ndim)
    return CemaCoefficients(
        p=a,
        log_mag=log_mag,
        phase=phase,
        gamma_re=gamma_real.astype(jnp.float32) * scale,
        gamma_im=gamma_imag.astype(jnp.float32) * scale,
    )


def _powers(coeffs: CemaCoefficients, lags: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Re and Im of q^j for float lags j (K,): two (D, N, K) float32 arrays, polar form."""
    mag = jnp.exp(coeffs.log_mag[..., None] * lags)
    angle = coeffs.phase[..., None] * lags
    return mag * jnp.cos(angle), mag * jnp.sin(angle)


def _lag_blocks(num_lags: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, num_lags)) for start in range(0, num_lags, block)]


class _PowerFactors(NamedTuple):
    """q^(start + a·S + s) = outer[..., a] · inner[..., s] for a < A, s < S (A·S ≥ count).

    outer_* (D, N, A) and inner_* (D, N, S) are float32 Re/Im parts, each from the polar form
    at its own lags, so a block of K lags costs D·N·(A + S) ≈ 2·D·N·√K transcendentals
    instead of D·N·K, and the lags become batched matmuls over N.
    """

    outer_re: jax.Array
    outer_im: jax.Array
    inner_re: jax.Array
    inner_im: jax.Array


def _inner_size(count: int) -> int:
    """S: the power of two nearest √count from above (A = ⌈count / S⌉ ≤ S)."""
    return 1 << max(0, math.ceil(math.log2(max(count, 1)) / 2))


def _power_factors(coeffs: CemaCoefficients, start: int, count: int) -> _PowerFactors:
    inner = _inner_size(count)
    num_outer = -(-count // inner)
    outer_lags = start + inner * jnp.arange(num_outer, dtype=jnp.float32)
    outer_re, outer_im = _powers(coeffs, outer_lags)
    inner_re, inner_im = _powers(coeffs, jnp.arange(inner, dtype=jnp.float32))
    return _PowerFactors(outer_re, outer_im, inner_re, inner_im)


def _expand_lags(w_re: jax.Array, w_im: jax.Array, factors: _PowerFactors, count: int) -> jax.Array:
    """Re(w · q^(start + j)) for j < count; w (..., D, N, A) complex as Re/Im → (..., D, count).

    `w` already carries the outer powers: the result is Σ_n Re(w[..., a]) Re(inner[s]) −
    Im(w[..., a]) Im(inner[s]) at j = a·S + s.
    """
    out = jnp.einsum("...dna,dns->...das", w_re, factors.inner_re) - jnp.einsum(
        "...dna,dns->...das", w_im, factors.inner_im
    )
    return out.reshape((*out.shape[:-2], -1))[..., :count]


def _lagged_real_parts(
    coeffs: CemaCoefficients, c_re: jax.Array, c_im: jax.Array, first: int, length: int, block: int
) -> jax.Array:
    """Re Σ_n c q^(first + j) for j < length; c (..., D, N) as Re/Im → (..., D, length)."""
    c_re, c_im = c_re[..., None], c_im[..., None]
    parts = []
    for lo, hi in _lag_blocks(length, block):
        f = _power_factors(coeffs, first + lo, hi - lo)
        w_re = c_re * f.outer_re - c_im * f.outer_im
        w_im = c_re * f.outer_im + c_im * f.outer_re
        parts.append(_expand_lags(w_re, w_im, f, hi - lo))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def cema_kernel(coeffs: CemaCoefficients, length: int, block: int = 4096) -> jax.Array:
    """Impulse response K[d, j] = Re Σ_n p γ q^j for j < length; (D, length) float32."""
    return _lagged_real_parts(
        coeffs, coeffs.p * coeffs.gamma_re, coeffs.p * coeffs.gamma_im, 0, length, block
    )


def fft_length(length: int) -> int:
    """Smallest power of two ≥ 2·length − 1 (linear, not circular, convolution)."""
    return max(2, 1 << (2 * length - 2).bit_length())


def causal_convolution(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """y[..., t] = Σ_{j ≤ t} kernel[..., j] x[..., t − j] by real FFTs; x (B,D,L), kernel (D,L)."""
    length = x.shape[-1]
    n_fft = fft_length(length)
    x_f = jnp.fft.rfft(x, n=n_fft)
    k_f = jnp.fft.rfft(kernel, n=n_fft)
    return jnp.fft.irfft(x_f * k_f, n=n_fft)[..., :length]


def initial_state_bias(
    coeffs: CemaCoefficients, h_init: jax.Array, length: int, block: int = 4096
) -> jax.Array:
    """bias[b, d, t] = Re Σ_n γ h_init q^(t+1); h_init (B,D,N) complex → (B, D, length)."""
    gh = coeffs.gamma * h_init
    return _lagged_real_parts(coeffs, jnp.real(gh), jnp.imag(gh), 1, length, block)


def closed_form_state(
    coeffs: CemaCoefficients, x: jax.Array, h_init: jax.Array | None, block: int = 4096
) -> jax.Array:
    """h_final = q^L h_init + p Σ_j q^(L−1−j) x[j]; x (B,D,L) float32 → (B,D,N) complex64."""
    length = x.shape[-1]
    x_rev = x[..., ::-1]  # x_rev[k] = x[L−1−k] pairs with q^k
    acc_re = jnp.zeros(x.shape[:2] + coeffs.p.shape[-1:], jnp.float32)
    acc_im = jnp.zeros_like(acc_re)
    for lo, hi in _lag_blocks(length, block):
        f = _power_factors(coeffs, lo, hi - lo)
        num_outer, inner = f.outer_re.shape[-1], f.inner_re.shape[-1]
        xs = jnp.pad(x_rev[..., lo:hi], ((0, 0), (0, 0), (0, num_outer * inner - (hi - lo))))
        xs = xs.reshape((*xs.shape[:2], num_outer, inner))  # (B, D, A, S)
        # Σ_s q^s x[a·S + s], then Σ_a q^(lo + a·S) · that.
        v_re = jnp.einsum("dns,bdas->bdna", f.inner_re, xs)
        v_im = jnp.einsum("dns,bdas->bdna", f.inner_im, xs)
        acc_re = acc_re + jnp.sum(f.outer_re * v_re - f.outer_im * v_im, axis=-1)
        acc_im = acc_im + jnp.sum(f.outer_re * v_im + f.outer_im * v_re, axis=-1)
    state = coeffs.p * jax.lax.complex(acc_re, acc_im)
    if h_init is not None:
        q_re, q_im = _powers(coeffs, jnp.full((1,), float(length), jnp.float32))
        state = state + jax.lax.complex(q_re[..., 0], q_im[..., 0]) * h_init
    return state


def _readout(coeffs: CemaCoefficients, h: jax.Array) -> jax.Array:
    """Re Σ_n γ h over the last axis of h (..., N) complex → (...) float32."""
    return jnp.sum(coeffs.gamma_re * jnp.real(h) - coeffs.gamma_im * jnp.imag(h), axis=-1)


def cema_fft(
    coeffs: CemaCoefficients,
    x: jax.Array,
    h_init: jax.Array | None = None,
    return_state: bool = False,
    block: int = 4096,
) -> tuple[jax.Array, jax.Array | None]:
    """FFT path. x (B, D, L) float32 → (y_ema (B, D, L) float32, final state or None)."""
    length = x.shape[-1]
    y = causal_convolution(x, cema_kernel(coeffs, length, block))
    if h_init is not None:
        y = y + initial_state_bias(coeffs, h_init, length, block)
    state = closed_form_state(coeffs, x, h_init, block) if return_state else None
    return y, state


def _decays(q: jax.Array, length: int, starts: jax.Array | None) -> jax.Array:
    """The factor A_t applied to h[t−1]: q, or 0 where a run starts; (L, B|1, D, N)."""
    a = jnp.broadcast_to(q, (length, 1, *q.shape))
    if starts is None:
        return a
    return jnp.where(jnp.moveaxis(starts, -1, 0)[..., None, None], jnp.zeros((), a.dtype), a)


def cema_associative_scan(
    coeffs: CemaCoefficients,
    x: jax.Array,
    h_init: jax.Array | None = None,
    starts: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Associative-scan path. x (B, D, L) float32 → (y_ema (B,D,L), states h (L, B, D, N)).

    `starts` (B, L) bool resets the state where a run starts (A_t = 0, spec §3.5).
    """
    q = coeffs.q  # (D, N)
    x_t = jnp.moveaxis(x, -1, 0)  # (L, B, D)
    b = coeffs.p * x_t[..., None].astype(jnp.complex64)  # (L, B, D, N)
    if h_init is not None:
        b = b.at[0].add(q * h_init)
    a = _decays(q, x_t.shape[0], starts)

    def combine(left, right):
        a_l, b_l = left
        a_r, b_r = right
        return a_r * a_l, a_r * b_l + b_r

    _, h = jax.lax.associative_scan(combine, (a, b), axis=0)
    y = jnp.moveaxis(_readout(coeffs, h), 0, -1)
    return y, h


def cema_sequential(
    coeffs: CemaCoefficients,
    x: jax.Array,
    h_init: jax.Array | None = None,
    starts: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sequential path (lax.scan). x (B, D, L) float32 → (y_ema (B, D, L), final state).

    `starts` (B, L) bool resets the state where a run starts.
    """
    q = coeffs.q
    if h_init is None:
        h_init = jnp.zeros(x.shape[:2] + q.shape[-1:], jnp.complex64)
    if x.shape[-1] == 1 and starts is None:  # one decode step: no loop
        h = q * h_init.astype(jnp.complex64) + coeffs.p * x
        return _readout(coeffs, h)[..., None], h

    def step(h: jax.Array, inputs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        x_t, a_t = inputs
        h = a_t * h + coeffs.p * x_t[..., None]
        return h, _readout(coeffs, h)

    decays = _decays(q, x.shape[-1], starts)
    h_final, y = jax.lax.scan(step, h_init.astype(jnp.complex64), (jnp.moveaxis(x, -1, 0), decays))
    return jnp.moveaxis(y, 0, -1), h_final


@jax.custom_vjp
def _in_block_lags(kernel: jax.Array, xb: jax.Array, pos: jax.Array) -> jax.Array:
    """y[t] = Σ_{k ≤ pos[t]} K[d, k] x[t − k] within each block; kernel (D, T),
    xb (B, D, nb, T), pos (B, 1, nb, T) → (B, D, nb, T).

    The lags run in a loop, forward and backward: unrolled, XLA CPU fused the lag sum and
    the layers below it into each of their consumers and recomputed them there (3× the
    train step; optimization barriers do not survive its pipeline).
    """
    size = kernel.shape[1]
    padded = jnp.pad(xb, ((0, 0), (0, 0), (0, 0), (size - 1, 0)))

    def lag(k, y):
        shifted = jax.lax.dynamic_slice_in_dim(padded, size - 1 - k, size, axis=3)
        weight = jax.lax.dynamic_index_in_dim(kernel, k, axis=1, keepdims=False)
        return y + weight[None, :, None, None] * jnp.where(pos >= k, shifted, 0.0)

    return jax.lax.fori_loop(0, size, lag, jnp.zeros_like(xb))


def _in_block_lags_fwd(kernel, xb, pos):
    return _in_block_lags(kernel, xb, pos), (kernel, xb, pos)


def _in_block_lags_bwd(residuals, g):
    kernel, xb, pos = residuals
    size = kernel.shape[1]
    padded = jnp.pad(xb, ((0, 0), (0, 0), (0, 0), (size - 1, 0)))

    def lag(k, carry):
        d_kernel, d_x = carry
        g_k = jnp.where(pos >= k, g, 0.0)
        shifted = jax.lax.dynamic_slice_in_dim(padded, size - 1 - k, size, axis=3)
        column = jnp.einsum("bdmt,bdmt->d", g_k, shifted)
        d_kernel = jax.lax.dynamic_update_index_in_dim(d_kernel, column, k, axis=1)
        g_padded = jnp.pad(g_k, ((0, 0), (0, 0), (0, 0), (0, size - 1)))
        weight = jax.lax.dynamic_index_in_dim(kernel, k, axis=1, keepdims=False)
        earlier = jax.lax.dynamic_slice_in_dim(g_padded, k, size, axis=3)
        return d_kernel, d_x + weight[None, :, None, None] * earlier

    zeros = (jnp.zeros_like(kernel), jnp.zeros_like(xb))
    d_kernel, d_x = jax.lax.fori_loop(0, size, lag, zeros)
    return d_kernel, d_x, None


_in_block_lags.defvjp(_in_block_lags_fwd, _in_block_lags_bwd)


# Timesteps per block of the blocked reset path: lags inside a block are summed directly,
# longer ones go through the block states (benchmarks/bench_packing.py chose it).
RESET_BLOCK = 16


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

    Returns:
      y_ema (B, D, L) float32 (no ω term): Σ_{k ≤ position[t]} K[k] x[t − k] for the
      impulse response K of `cema_kernel`; with `return_state`, also the state after the
      last timestep (B, D, N) complex64, from its run's start (or from a zero state before
      x when that run starts earlier: positions may exceed t, as in a context shard).

    Inside a block, y[t] sums K[k] x[t − k] over the lags k < T that stay in the block and in
    the run (k ≤ position[t]). Each block reduces to its end state (from its last reset, or
    its start); an associative scan over the blocks, which drops the incoming state of a
    block that holds a reset, gives every block's incoming state s, whose term
    Re Σ_n γ q^(t − b0 + 1) s reaches the timesteps of the block before its first reset.
    """
    batch, dim, length = x.shape
    blocks = -(-length // size)
    pad = blocks * size - length
    # Zeros in front (not behind) keep the last block's end state the final state.
    xb = jnp.pad(x, ((0, 0), (0, 0), (pad, 0))).reshape(batch, dim, blocks, size)
    pos = jnp.pad(position, ((0, 0), (pad, 0))).reshape(batch, 1, blocks, size)
    offset = jnp.arange(size, dtype=jnp.int32)  # t − b0

    # q^j for j ≤ T, straight from the polar form (T is small): (D, N, T + 1) each.
    pow_re, pow_im = _powers(coeffs, jnp.arange(size + 1, dtype=jnp.float32))
    kernel = cema_kernel(coeffs, size)  # K[d, k] for k < T
    y = _in_block_lags(kernel, xb, pos)

    # The end state of each block from its last reset (earlier inputs drop out):
    # p Σ_k q^k x[end − k], as Re/Im parts (nb, B, D, N).
    end = pos[..., -1:]  # (B, 1, nb, 1)
    kept = (xb * (size - 1 - offset <= end))[..., ::-1]  # lag k = T − 1 − offset
    local_re = coeffs.p * jnp.einsum("bdmk,dnk->mbdn", kept, pow_re[..., :size])
    local_im = coeffs.p * jnp.einsum("bdmk,dnk->mbdn", kept, pow_im[..., :size])
    decay_re, decay_im = pow_re[..., size], pow_im[..., size]  # q^T (D, N)
    carries = jnp.moveaxis(end[:, 0, :, 0] >= size, 1, 0)[..., None, None]  # (nb, B, 1, 1)

    def step(state, block):
        # Real and imaginary parts kept apart: complex arithmetic is slow on XLA CPU.
        s_re, s_im = state
        l_re, l_im, carry = block
        n_re = jnp.where(carry, decay_re * s_re - decay_im * s_im, 0.0) + l_re
        n_im = jnp.where(carry, decay_re * s_im + decay_im * s_re, 0.0) + l_im
        return (n_re, n_im), state

    zeros = jnp.zeros(local_re.shape[1:], jnp.float32)
    (last_re, last_im), (in_re, in_im) = jax.lax.scan(
        step, (zeros, zeros), (local_re, local_im, carries)
    )
    # Re Σ_n γ s q^(offset + 1) for the incoming state s of each block.
    gs_re = coeffs.gamma_re * in_re - coeffs.gamma_im * in_im
    gs_im = coeffs.gamma_re * in_im + coeffs.gamma_im * in_re
    bias = jnp.einsum("mbdn,dnt->bdmt", gs_re, pow_re[..., 1:]) - jnp.einsum(
        "mbdn,dnt->bdmt", gs_im, pow_im[..., 1:]
    )
    y = y + jnp.where(pos > offset, bias, 0.0)
    y = y.reshape(batch, dim, blocks * size)[..., pad:]
    if return_state:
        return y, jax.lax.complex(last_re, last_im)
    return y


def _moving_average(
    coeffs: CemaCoefficients,
    x: jax.Array,
    h_init: jax.Array | None,
    path: str,
    return_state: bool,
    block: int,
) -> tuple[jax.Array, jax.Array | None]:
    """Re Σ_n γ h[t] for x (B, D, L) float32 by `path`: (B, D, L) and the final state|None."""
    if path == "fft":
        return cema_fft(coeffs, x, h_init, return_state, block)
    if path == "scan":
        y, states = cema_associative_scan(coeffs, x, h_init)
        return y, states[-1] if return_state else None
    if path == "sequential":
        y, state = cema_sequential(coeffs, x, h_init)
        return y, state if return_state else None
    raise ValueError(f"unknown CEMA path {path!r}")


def sharded_moving_average(
    coeffs: CemaCoefficients,
    x: jax.Array,
    path: str,
    block: int,
    split: context_parallel.ContextSplit,
) -> tuple[jax.Array, jax.Array]:
    """`_moving_average` from a zero state with L of x (B, D, L) split as `split` says:
    (B, D, L) float32 and the final state (B, D, N) complex64."""

    def body(coeffs: CemaCoefficients, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        length = x.shape[-1]
        local = split.vary(coeffs)
        y, h = _moving_average(local, x, None, path, True, block)
        # The fold uses the replicated coefficients: its result is alike on every shard.
        q_re, q_im = _powers(coeffs, jnp.full((1,), float(length), jnp.float32))
        decay = jax.lax.complex(q_re[..., 0], q_im[..., 0])  # q^S (D, N)

        def combine(before: jax.Array, shard: jax.Array) -> jax.Array:
            return decay * before + shard

        # Gathered as float32 pairs: the collective then needs no complex support.
        parts = split.gather(jnp.stack([jnp.real(h), jnp.imag(h)]))
        gathered = jax.lax.complex(parts[:, 0], parts[:, 1])
        h_in, h_total = split.exclusive_fold(gathered, combine, jnp.zeros(h.shape, h.dtype))
        return y + initial_state_bias(local, h_in, length, block), h_total

    seq = split.spec("batch", None, "length")
    run = split.map(body, (split.spec(), seq), (seq, split.spec("batch")))
    return run(coeffs, x)


def cema(
    coeffs: CemaCoefficients,
    omega: jax.Array,
    x: jax.Array,
    h_init: jax.Array | None = None,
    path: str = "fft",
    return_state: bool = False,
    block: int = 4096,
    split: context_parallel.ContextSplit | None = None,
    segments: Segments | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """CEMA on the channel-major input x (B, D, L); returns (y (B,D,L) f32, state (B,D,N)|None).

    `split` (from `context_parallel.active_split`) splits L over a mesh axis; the call then
    starts from a zero state. `segments` resets the state at every run start (a fresh call
    that returns no state): the "fft" path then runs `cema_blocked_resets`, "scan" and
    "sequential" their recurrences with A_t = 0 at run starts.
    """
    x = x.astype(jnp.float32)
    if segments is not None:
        if h_init is not None or return_state or split is not None:
            raise ValueError(
                "a CEMA over packed rows (segments) starts from a zero state, returns no "
                "state and runs unsplit"
            )
        if path == "fft":
            y = cema_blocked_resets(coeffs, x, segments.position)
        elif path == "scan":
            y, _ = cema_associative_scan(coeffs, x, None, segments.starts)
        elif path == "sequential":
            y, _ = cema_sequential(coeffs, x, None, segments.starts)
        else:
            raise ValueError(f"unknown CEMA path {path!r}")
        state = None
    elif split is None:
        y, state = _moving_average(coeffs, x, h_init, path, return_state, block)
    elif h_init is not None:
        raise ValueError("a CEMA split over a context axis starts from a zero state")
    else:
        y, state = sharded_moving_average(coeffs, x, path, block, split)
        state = state if return_state else None
    y = y + omega.astype(jnp.float32)[:, None] * x
    return y, state
