"""Float64 NumPy oracles of rotary embeddings, chunked attention and the streaming KV ring
(spec §2.5, §5)."""

from __future__ import annotations

import numpy as np


def rope(x: np.ndarray, positions: np.ndarray, freqs: np.ndarray, layout: str) -> np.ndarray:
    """Rotation as complex multiplication in float64.

    The angle is the float32 product pos·ω (the spec computes RoPE angles in float32);
    everything after that is exact up to float64 rounding.
    """
    x = np.asarray(x, np.float64)
    angles = (positions.astype(np.float32)[..., None] * freqs.astype(np.float32)).astype(np.float64)
    if angles.ndim == 2:
        angles = angles[None]
    rot = np.exp(1j * angles)[:, :, None, :]  # (B|1, L, 1, Dh/2)
    half = x.shape[-1] // 2
    if layout == "adjacent":
        z = (x[..., 0::2] + 1j * x[..., 1::2]) * rot
        return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
    z = (x[..., :half] + 1j * x[..., half:]) * rot
    return np.concatenate([z.real, z.imag], axis=-1)


def dense_chunked_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    chunk: int,
    key_valid: np.ndarray | None = None,
) -> np.ndarray:
    """Float64 softmax attention with mask s ≤ t ∧ floor(s/C) = floor(t/C) ∧ valid(s).

    q, k: (B, L, H, Dh); v: (B, L, H, Dv); times start at 0. Rows with no visible key are 0.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, length = q.shape[:2]
    t = np.arange(length)
    allowed = (t[None, :] <= t[:, None]) & (t[None, :] // chunk == t[:, None] // chunk)
    allowed = np.broadcast_to(allowed, (batch, length, length))
    if key_valid is not None:
        allowed = allowed & np.asarray(key_valid, bool)[:, None, :]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k)
    mask = allowed[:, None]
    scores = np.where(mask, scores, -np.inf)
    row_max = np.max(scores, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.where(mask, np.exp(scores - row_max), 0.0)
    denom = np.sum(weights, axis=-1, keepdims=True)
    probs = np.where(denom > 0, weights / np.where(denom > 0, denom, 1.0), 0.0)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


def ring(entries: np.ndarray, position: int, chunk: int) -> np.ndarray:
    """Ring by slot after `position` tokens, (B, C, H, ·): slot j holds the latest entry t < T
    with t ≡ j (mod C), zeros where no token has reached the slot."""
    out = np.zeros((entries.shape[0], chunk, *entries.shape[2:]), entries.dtype)
    for t in range(position):
        out[:, t % chunk] = entries[:, t]
    return out
