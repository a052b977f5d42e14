"""Float64 NumPy oracles of TimestepNorm (spec §4).

x is (B, L, D) split into `num_groups` groups of D / G features; `mask` (B, L) marks the valid
timesteps (None: all valid); `state` is the incoming `(count (B,), mean (B, G), var (B, G))`
as NumPy arrays, None for the fresh state (count 0, mean 0, var 1).
"""

from __future__ import annotations

import numpy as np

State = tuple[np.ndarray, np.ndarray, np.ndarray]


def _state64(state: State | None, batch: int, num_groups: int) -> State:
    if state is None:
        return np.zeros(batch), np.zeros((batch, num_groups)), np.ones((batch, num_groups))
    return tuple(np.asarray(a, np.float64) for a in state)


def brute_force(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    num_groups: int,
    eps: float,
    mask: np.ndarray | None = None,
    state: State | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, State]:
    """Collects S(b, g, t) of §4.1 literally and merges the incoming state exactly.

    Returns y (B, L, D) (zero at masked timesteps), mean and var (B, L, G), the final state.
    """
    x = np.asarray(x, np.float64)
    batch, length, dim = x.shape
    gs = dim // num_groups
    valid = np.ones((batch, length), bool) if mask is None else mask
    c0, m0, v0 = _state64(state, batch, num_groups)
    scale = 1.0 + np.asarray(weight, np.float64)
    shift = np.asarray(bias, np.float64)
    y = np.zeros_like(x)
    mean = np.empty((batch, length, num_groups))
    var = np.empty((batch, length, num_groups))
    for b in range(batch):
        for g in range(num_groups):
            feats = slice(g * gs, (g + 1) * gs)
            n_in = c0[b] * gs  # scalars summarized by the incoming state
            for t in range(length):
                scalars = x[b, : t + 1][valid[b, : t + 1]][:, feats].ravel()
                n = n_in + scalars.size
                if n == 0:
                    mu, sigma2 = m0[b, g], v0[b, g]
                else:
                    mu = (n_in * m0[b, g] + scalars.sum()) / n
                    sigma2 = (
                        n_in * (v0[b, g] + (m0[b, g] - mu) ** 2) + np.sum((scalars - mu) ** 2)
                    ) / n
                mean[b, t, g], var[b, t, g] = mu, sigma2
                if valid[b, t]:
                    normed = (x[b, t, feats] - mu) / np.sqrt(sigma2 + eps)
                    y[b, t, feats] = normed * scale[feats] + shift[feats]
    count = c0 + valid.sum(axis=1)
    return y, mean, var, (count, mean[:, -1], var[:, -1])


def block_welford(
    x: np.ndarray, num_groups: int, mask: np.ndarray, state: State | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sequential block Welford of §4.3: mean, var (B, L, G) and seen (B, L)."""
    xg = np.asarray(x, np.float64).reshape(x.shape[0], x.shape[1], num_groups, -1)
    c0, m0, v0 = _state64(state, x.shape[0], num_groups)
    mean = np.empty(xg.shape[:3])
    var = np.empty(xg.shape[:3])
    for b in range(xg.shape[0]):
        c, m, v = float(c0[b]), m0[b], v0[b]
        for t in range(xg.shape[1]):
            if mask[b, t]:
                mu_blk = xg[b, t].mean(-1)
                v_blk = np.mean((xg[b, t] - mu_blk[:, None]) ** 2, axis=-1)
                c_new = c + 1.0
                delta = mu_blk - m
                m = m + delta / c_new
                v = (c / c_new) * v + v_blk / c_new + (c / c_new) * (1.0 / c_new) * delta**2
                c = c_new
            mean[b, t], var[b, t] = m, v
    seen = (np.cumsum(mask, axis=1) + c0[:, None]) > 0
    return mean, var, seen


def hf_statistics(
    x: np.ndarray, num_groups: int, mask: np.ndarray, state: State | None = None
) -> tuple[np.ndarray, np.ndarray, State]:
    """Direct loop of megalodon-hf's formulas (§4.6): mean, var (B, L, G), the final state."""
    gm_all = np.asarray(x, np.float64).reshape(x.shape[0], x.shape[1], num_groups, -1).mean(-1)
    c0, m0, v0 = _state64(state, x.shape[0], num_groups)
    mean = np.empty(gm_all.shape)
    var = np.empty(gm_all.shape)
    for b in range(gm_all.shape[0]):
        prev_mean = m0[b]
        count, weighted_sum, m2 = c0[b], c0[b] * m0[b], v0[b] * max(c0[b], 1.0)
        for t in range(gm_all.shape[1]):
            w = float(mask[b, t])
            gm = gm_all[b, t]
            count = count + w
            weighted_sum = weighted_sum + w * gm
            mean_t = weighted_sum / max(count, 1.0) if count > 0 else m0[b]
            m2 = m2 + w * (gm - prev_mean) * (gm - mean_t)
            var_t = m2 / max(count, 1.0) if count > 0 else v0[b]
            mean[b, t], var[b, t] = mean_t, np.maximum(var_t, 1e-6)
            prev_mean = mean_t
    count = c0 + mask.sum(axis=1)
    return mean, var, (count, mean[:, -1], var[:, -1])
