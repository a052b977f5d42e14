"""Float64 NumPy oracles of CEMA (spec §3), computed from the raw float32 parameters.

`params` holds the six parameters of one CEMA layer as NumPy arrays with the Flax shapes:
alpha, delta (D, N, 1), theta (D, 1, 1), gamma_real, gamma_imag (D, N), omega (D,).
"""

from __future__ import annotations

import math

import numpy as np

Params = dict[str, np.ndarray]


def sigmoid(v: np.ndarray) -> np.ndarray:
    """The logistic function in float64."""
    v = np.asarray(v, np.float64)
    return 1.0 / (1.0 + np.exp(-v))


def coefficients(params: Params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """p (D,N) real, q (D,N) complex, γ (D,N) complex in float64, straight from §3.2."""
    ndim = params["alpha"].shape[1]
    a = sigmoid(params["alpha"][..., 0])
    d = sigmoid(params["delta"][..., 0])
    base = sigmoid(params["theta"][:, 0, :]) * 2.0 * np.pi / ndim
    phase = base * np.arange(1, ndim + 1)
    q = (1.0 - a * d) * np.exp(1j * phase)
    gamma = (
        params["gamma_real"].astype(np.float64) + 1j * params["gamma_imag"].astype(np.float64)
    ) / math.sqrt(ndim)
    return a, q, gamma


def recurrence(
    params: Params, x: np.ndarray, h_init: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 loop of §3.3. x (B,D,L) → (y (B,D,L) incl. omega, states (L,B,D,N) complex128)."""
    p, q, gamma = coefficients(params)
    x = np.asarray(x, np.float64)
    batch, dim, length = x.shape
    h = np.zeros((batch, dim, q.shape[-1]), np.complex128)
    if h_init is not None:
        h = h + np.asarray(h_init, np.complex128)
    ys = np.empty((batch, dim, length))
    states = np.empty((length, *h.shape), np.complex128)
    for t in range(length):
        h = q * h + p * x[:, :, t, None]
        states[t] = h
        ys[:, :, t] = np.real(np.sum(gamma * h, axis=-1))
    omega = params["omega"].astype(np.float64)
    return ys + omega[:, None] * x, states


def kernel(params: Params, length: int) -> np.ndarray:
    """Closed-form K[d, j] = Re Σ_n p γ q^j of §3.4 in float64, shape (D, length)."""
    p, q, gamma = coefficients(params)
    j = np.arange(length)
    powers = np.abs(q)[..., None] ** j * np.exp(1j * np.angle(q)[..., None] * j)
    return np.real(np.einsum("dn,dnj->dj", p * gamma, powers))
