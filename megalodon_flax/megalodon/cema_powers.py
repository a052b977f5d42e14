"""CEMA coefficients and powers: the derived p, q, γ of a layer, q^j in polar form, and the
impulse response K[d, j] = Re Σ_n p γ q^j (spec §3)."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

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


def powers(coeffs: CemaCoefficients, lags: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Re and Im of q^j for float lags j (K,): two (D, N, K) float32 arrays, polar form."""
    mag = jnp.exp(coeffs.log_mag[..., None] * lags)
    angle = coeffs.phase[..., None] * lags
    return mag * jnp.cos(angle), mag * jnp.sin(angle)


def lag_blocks(num_lags: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, num_lags)) for start in range(0, num_lags, block)]


class PowerFactors(NamedTuple):
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


def power_factors(coeffs: CemaCoefficients, start: int, count: int) -> PowerFactors:
    inner = _inner_size(count)
    num_outer = -(-count // inner)
    outer_lags = start + inner * jnp.arange(num_outer, dtype=jnp.float32)
    outer_re, outer_im = powers(coeffs, outer_lags)
    inner_re, inner_im = powers(coeffs, jnp.arange(inner, dtype=jnp.float32))
    return PowerFactors(outer_re, outer_im, inner_re, inner_im)


def _expand_lags(w_re: jax.Array, w_im: jax.Array, factors: PowerFactors, count: int) -> jax.Array:
    """Re(w · q^(start + j)) for j < count; w (..., D, N, A) complex as Re/Im → (..., D, count).

    `w` already carries the outer powers: the result is Σ_n Re(w[..., a]) Re(inner[s]) −
    Im(w[..., a]) Im(inner[s]) at j = a·S + s.
    """
    out = jnp.einsum("...dna,dns->...das", w_re, factors.inner_re) - jnp.einsum(
        "...dna,dns->...das", w_im, factors.inner_im
    )
    return out.reshape((*out.shape[:-2], -1))[..., :count]


def lagged_real_parts(
    coeffs: CemaCoefficients, c_re: jax.Array, c_im: jax.Array, first: int, length: int, block: int
) -> jax.Array:
    """Re Σ_n c q^(first + j) for j < length; c (..., D, N) as Re/Im → (..., D, length)."""
    c_re, c_im = c_re[..., None], c_im[..., None]
    parts = []
    for lo, hi in lag_blocks(length, block):
        f = power_factors(coeffs, first + lo, hi - lo)
        w_re = c_re * f.outer_re - c_im * f.outer_im
        w_im = c_re * f.outer_im + c_im * f.outer_re
        parts.append(_expand_lags(w_re, w_im, f, hi - lo))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def cema_kernel(coeffs: CemaCoefficients, length: int, block: int = 4096) -> jax.Array:
    """Impulse response K[d, j] = Re Σ_n p γ q^j for j < length; (D, length) float32."""
    return lagged_real_parts(
        coeffs, coeffs.p * coeffs.gamma_re, coeffs.p * coeffs.gamma_im, 0, length, block
    )
