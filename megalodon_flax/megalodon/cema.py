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
Over packed rows h_j counts from the shard's last run start, and a shard holding one cuts
the sum; the bias reaches the timesteps before the shard's first run start.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from megalodon_flax.layers import remat
from megalodon_flax.layers.segments import Segments
from megalodon_flax.megalodon import context_parallel
from megalodon_flax.megalodon.cema_powers import (
    CemaCoefficients,
    cema_kernel,
    lag_blocks,
    lagged_real_parts,
    power_factors,
    powers,
)
from megalodon_flax.megalodon.cema_resets import cema_blocked_resets


def fft_length(length: int) -> int:
    """Smallest power of two ≥ 2·length − 1 (linear, not circular, convolution)."""
    return max(2, 1 << (2 * length - 2).bit_length())


def _named_complex(z: jax.Array, name: str) -> jax.Array:
    """z (complex) with its real and imaginary parts tagged `name` for remat policies."""
    return jax.lax.complex(checkpoint_name(jnp.real(z), name), checkpoint_name(jnp.imag(z), name))


def causal_convolution(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """y[..., t] = Σ_{j ≤ t} kernel[..., j] x[..., t − j] by real FFTs; x (B,D,L), kernel (D,L)."""
    length = x.shape[-1]
    n_fft = fft_length(length)
    x_f = _named_complex(jnp.fft.rfft(x, n=n_fft), remat.CEMA_SPECTRUM)
    k_f = _named_complex(jnp.fft.rfft(kernel, n=n_fft), remat.CEMA_KERNEL_SPECTRUM)
    return jnp.fft.irfft(x_f * k_f, n=n_fft)[..., :length]


def initial_state_bias(
    coeffs: CemaCoefficients, h_init: jax.Array, length: int, block: int = 4096
) -> jax.Array:
    """bias[b, d, t] = Re Σ_n γ h_init q^(t+1); h_init (B,D,N) complex → (B, D, length)."""
    gh = coeffs.gamma * h_init
    return lagged_real_parts(coeffs, jnp.real(gh), jnp.imag(gh), 1, length, block)


def closed_form_state(
    coeffs: CemaCoefficients, x: jax.Array, h_init: jax.Array | None, block: int = 4096
) -> jax.Array:
    """h_final = q^L h_init + p Σ_j q^(L−1−j) x[j]; x (B,D,L) float32 → (B,D,N) complex64."""
    length = x.shape[-1]
    x_rev = x[..., ::-1]  # x_rev[k] = x[L−1−k] pairs with q^k
    acc_re = jnp.zeros(x.shape[:2] + coeffs.p.shape[-1:], jnp.float32)
    acc_im = jnp.zeros_like(acc_re)
    for lo, hi in lag_blocks(length, block):
        f = power_factors(coeffs, lo, hi - lo)
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
        q_re, q_im = powers(coeffs, jnp.full((1,), float(length), jnp.float32))
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
    if h_init is None:  # derived from x: in a context shard a per-shard value too
        zero = jnp.zeros_like(x[..., :1], jnp.complex64)
        h_init = jnp.broadcast_to(zero, x.shape[:2] + q.shape[-1:])
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


def _moving_average_with_resets(
    coeffs: CemaCoefficients, x: jax.Array, segments: Segments, path: str, return_state: bool
) -> tuple[jax.Array, jax.Array | None]:
    """Re Σ_n γ h[t] for x (B, D, L) float32 from a zero state, reset at every run start of
    `segments`: (B, D, L) and the state after the last timestep (B, D, N) complex64 or None,
    which counts from the last run start (or from the start of x when x holds none)."""
    if path == "fft":
        if return_state:
            return cema_blocked_resets(coeffs, x, segments.position, return_state=True)
        return cema_blocked_resets(coeffs, x, segments.position), None
    if path == "scan":
        y, states = cema_associative_scan(coeffs, x, None, segments.starts)
        return y, states[-1] if return_state else None
    if path == "sequential":
        y, state = cema_sequential(coeffs, x, None, segments.starts)
        return y, state if return_state else None
    raise ValueError(f"unknown CEMA path {path!r}")


def sharded_moving_average(
    coeffs: CemaCoefficients,
    x: jax.Array,
    path: str,
    block: int,
    split: context_parallel.ContextSplit,
    segments: Segments | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`_moving_average` from a zero state with L of x (B, D, L) split as `split` says:
    (B, D, L) float32 and the final state (B, D, N) complex64.

    `segments` (packed rows: the run layout of the whole rows) resets the state at every run
    start. A shard's state then counts from its last run start, and a shard that holds one
    (per row) cuts the fold; the incoming state reaches only the timesteps before the
    shard's first run start.
    """

    def body(
        coeffs: CemaCoefficients, x: jax.Array, segments: Segments | None
    ) -> tuple[jax.Array, jax.Array]:
        length = x.shape[-1]
        local = split.vary(coeffs)
        if segments is None:
            y, h = _moving_average(local, x, None, path, True, block)
        else:
            y, h = _moving_average_with_resets(local, x, segments, path, True)
        # The fold uses the replicated coefficients: its result is alike on every shard.
        q_re, q_im = powers(coeffs, jnp.full((1,), float(length), jnp.float32))
        decay = jax.lax.complex(q_re[..., 0], q_im[..., 0])  # q^S (D, N)
        # Gathered as float32 pairs: the collective then needs no complex support.
        parts = split.gather(jnp.stack([jnp.real(h), jnp.imag(h)]))
        gathered = jax.lax.complex(parts[:, 0], parts[:, 1])
        zeros = jnp.zeros(h.shape, h.dtype)
        if segments is None:
            h_in, h_total = split.exclusive_fold(gathered, lambda b, s: decay * b + s, zeros)
            return y + initial_state_bias(local, h_in, length, block), h_total

        def combine(before: tuple, shard: tuple) -> tuple:
            (h_b, reset_b), (h_s, reset_s) = before, shard
            carried = jnp.where(reset_s[:, None, None], 0.0, decay * h_b)
            return carried + h_s, reset_b | reset_s

        holds_start = segments.position[:, -1] < length  # the last run starts in the shard
        resets = split.gather(holds_start)
        identity = (zeros, jnp.zeros(holds_start.shape, bool))
        (h_in, _), (h_total, _) = split.exclusive_fold((gathered, resets), combine, identity)
        bias = initial_state_bias(local, h_in, length, block)
        continued = segments.position > jnp.arange(length)  # the run began in an earlier shard
        return y + jnp.where(continued[:, None, :], bias, 0.0), h_total

    seq = split.spec("batch", None, "length")
    out_specs = (seq, split.spec("batch"))
    if segments is None:
        run = split.map(lambda c, a: body(c, a, None), (split.spec(), seq), out_specs)
        return run(coeffs, x)
    in_specs = (split.spec(), seq, split.spec("batch", "length"))
    return split.map(body, in_specs, out_specs)(coeffs, x, segments)


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
    starts from a zero state. `segments` (the run layout of the whole rows) resets the state
    at every run start (a fresh call that returns no state): the "fft" path then runs
    `cema_blocked_resets`, "scan" and "sequential" their recurrences with A_t = 0 at run
    starts, each shard of a split from a zero state. Unsplit over a mesh, each device runs
    its own rows (`context_parallel.per_row`).
    """
    x = x.astype(jnp.float32)
    if split is not None and h_init is not None:
        raise ValueError("a CEMA split over a context axis starts from a zero state")
    if segments is not None and (h_init is not None or return_state):
        raise ValueError(
            "a CEMA over packed rows (segments) starts from a zero state and returns no state"
        )
    if split is None:

        def rows_average(
            coeffs: CemaCoefficients, rows: tuple
        ) -> tuple[jax.Array, jax.Array | None]:
            x, h_init, segments = rows
            if segments is not None:
                return _moving_average_with_resets(coeffs, x, segments, path, False)[0], None
            return _moving_average(coeffs, x, h_init, path, return_state, block)

        y, state = context_parallel.per_row(rows_average, coeffs, (x, h_init, segments))
    else:
        y, state = sharded_moving_average(coeffs, x, path, block, split, segments)
        state = state if return_state else None
    y = y + omega.astype(jnp.float32)[:, None] * x
    return y, state
