"""Float64 NumPy reference of megalodon-hf's `MegalodonForCausalLM` forward pass.

Operates directly on the megalodon-hf state-dict keys (spec §8.1): `model.embed.weight`,
`model.layers.{i}.attn.{timenorm,cema,rmsnorm,wz,wv,wr,wh1,wh2,gamma,beta}.*`,
`model.layers.{i}.ffn.{norm,fc1,fc2,fc3}.*`, `model.norm.*`, `lm_head.weight`.

Behaviour reproduced (pszemraj/megalodon-hf, src/megalodon/modeling_megalodon.py):

* `TimestepNorm.forward`: statistics of the per-timestep group means only (Welford over the
  means), the fresh state (count 0, mean 0, var 1) entering M2 with weight max(count, 1),
  variance floored at `VARIANCE_FLOOR = 1e-6`, `attention_mask` used for the statistics
  only (padded outputs are normalized, not zeroed), scale stored as `weight + 1`.
* `ComplexEMA`: p = σ(alpha), q = (1 − σ(alpha)σ(delta))·exp(i·n·σ(theta)·2π/N),
  γ = (gamma_real + i·gamma_imag)/√N, output Re(Σ γ h) + omega·x. The FFT (training) and
  sequential (cached) paths of HF compute the same recurrence, evaluated here as a loop.
* `RMSNorm` with scale `gamma + 1`; per-head RMS normalization of z (no affine), then
  `z·(gamma + 1)/√Dh + beta` for q (row 0) and k (row 1); v from the TimestepNorm output.
* `RotaryEmbedding`: half-split pairs (x[j], x[j + Dh/2]), inv_freq = base^(−j/(Dh/2)),
  absolute positions.
* `ChunkedSelfAttention`: softmax(q·kᵀ) with scale 1, keys restricted to the query's chunk
  of C absolute positions, causal, padded keys masked; the streaming cache keeps the keys of
  the current chunk and is emptied at every chunk boundary (`max_cache_len == chunk_size`).
* `NormalizedFFN`: `nn.LayerNorm` with a direct scale, SwiGLU optional, residual = block
  input (two-hop), optional constant rescale 0.1·0.5^layer.
* Final TimestepNorm `model.norm`, LM head `lm_head.weight` (the embedding when absent).

`variant` selects how padding is treated, the only place where the recent megalodon-hf
revisions differ for this forward pass (older ones differ more: no variance floor, scores
divided by √Dh, direct norm scales; their checkpoints are out of scope):

* "spec": the revision the spec documents. CEMA is fed the padded positions; padded queries
  attend like valid ones. A query with no attendable key has an undefined output in HF (NaN
  from SDPA's all −inf row, or a backend-specific value); it is NaN here, and the NaN spreads
  as in HF: through the rest of its chunk block (NaN + −inf, 0·NaN) and through the running
  statistics (HF multiplies by the mask, so NaN·0 poisons later steps).
* "latest": newer revisions zero masked CEMA inputs (including the omega term), zero the
  attention output of padded queries, and derive RoPE positions from the mask
  (`start + cumsum(mask) − 1`, clamped at 0).

For right padding both give the same logits at valid positions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

VARIANCE_FLOOR = 1e-6
VARIANTS = ("spec", "latest")


@dataclasses.dataclass
class NormState:
    """TimestepNorm stream state: count (B,) int, mean (B, G), var (B, G) float64."""

    count: np.ndarray
    mean: np.ndarray
    var: np.ndarray

    @classmethod
    def fresh(cls, batch: int, groups: int) -> NormState:
        return cls(np.zeros(batch, np.int64), np.zeros((batch, groups)), np.ones((batch, groups)))


@dataclasses.dataclass
class LayerState:
    """One block: TimestepNorm state, CEMA h (B, D, N) complex128, rotated keys / values of
    the current chunk (B, n, H, Dh) / (B, n, H, Dv)."""

    norm: NormState
    ema: np.ndarray
    keys: np.ndarray
    values: np.ndarray


@dataclasses.dataclass
class HFState:
    """The whole stream: per-layer states, the final TimestepNorm state, tokens consumed."""

    layers: list[LayerState]
    final_norm: NormState
    position: int


@dataclasses.dataclass(frozen=True)
class _Dims:
    vocab: int
    d: int
    layers: int
    heads: int
    z: int
    e: int
    n: int
    chunk: int
    groups: int
    eps: float
    swiglu: bool
    rescale_nffn: bool
    scale_emb: bool
    rope_base: float

    @property
    def dh(self) -> int:
        return self.z // self.heads

    @property
    def dv(self) -> int:
        return self.e // self.heads


def _dims(sd: Mapping[str, np.ndarray], cfg: Mapping[str, Any]) -> _Dims:
    vocab, d = sd["model.embed.weight"].shape
    rope_base = cfg.get("rope_base")
    return _Dims(
        vocab=vocab,
        d=d,
        layers=int(cfg["num_layers"]),
        heads=int(cfg["num_heads"]),
        z=sd["model.layers.0.attn.wz.weight"].shape[0],
        e=sd["model.layers.0.attn.wv.weight"].shape[0],
        n=sd["model.layers.0.attn.cema.alpha"].shape[1],
        chunk=int(cfg["chunk_size"]),
        groups=int(cfg["norm_num_groups"]),
        eps=float(cfg.get("norm_eps", 1e-5)),
        swiglu="model.layers.0.ffn.fc3.weight" in sd,
        rescale_nffn=bool(cfg.get("rescale_nffn", False)),
        scale_emb=bool(cfg.get("scale_emb", False)),
        rope_base=10000.0 if rope_base is None else float(rope_base),
    )


def _f64(sd: Mapping[str, Any], key: str) -> np.ndarray:
    return np.asarray(sd[key]).astype(np.float64)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _silu(x: np.ndarray) -> np.ndarray:
    return x * _sigmoid(x)


def _dense(sd: Mapping[str, Any], name: str, x: np.ndarray) -> np.ndarray:
    """PyTorch nn.Linear: x Wᵀ + b with W (out, in)."""
    y = x @ _f64(sd, f"{name}.weight").T
    if f"{name}.bias" in sd:
        y = y + _f64(sd, f"{name}.bias")
    return y


def _affine_or_identity(sd: Mapping[str, Any], name: str, d: int) -> tuple[np.ndarray, ...]:
    """TimestepNorm / RMSNorm scale offsets; absent (norm_affine=False) means zero offsets."""
    weight = _f64(sd, f"{name}.weight") if f"{name}.weight" in sd else np.zeros(d)
    bias = _f64(sd, f"{name}.bias") if f"{name}.bias" in sd else np.zeros(d)
    return weight, bias


def timestep_norm(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    groups: int,
    eps: float,
    valid: np.ndarray,
    state: NormState,
) -> tuple[np.ndarray, NormState]:
    """HF TimestepNorm on x (B, L, D) from `state`; valid (B, L) bool. Loop over time."""
    b, length, d = x.shape
    gs = d // groups
    count = state.count.astype(np.int64).copy()
    mean = state.mean.astype(np.float64).copy()
    var0 = state.var.astype(np.float64)
    # HF rebuilds M2 from the incoming variance with weight max(count, 1): the fresh prior
    # variance 1 enters with weight 1 and then decays like 1/count.
    m2 = var0 * np.maximum(count, 1)[:, None]
    y = np.empty_like(x, dtype=np.float64)
    var = var0
    for t in range(length):
        xt = x[:, t].reshape(b, groups, gs)
        gm = xt.mean(axis=-1)
        v = valid[:, t].astype(np.float64)[:, None]
        new_count = count + valid[:, t].astype(np.int64)
        safe = np.maximum(new_count, 1)[:, None]
        delta = gm - mean
        # Multiplying by the mask (not selecting) is HF's arithmetic: NaN at a padded step
        # poisons the running statistics exactly as it does there.
        new_mean = mean + delta * v / safe
        m2 = m2 + delta * (gm - new_mean) * v
        mean, count = new_mean, new_count
        var = np.where(count[:, None] > 0, m2 / safe, var0)
        var = np.maximum(var, VARIANCE_FLOOR)
        xhat = (xt - mean[..., None]) / np.sqrt(var[..., None] + eps)
        y[:, t] = xhat.reshape(b, d) * (1.0 + weight) + bias
    return y, NormState(count, mean, var)


def cema_coefficients(
    sd: Mapping[str, Any], prefix: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(p (D, N) real, q (D, N) complex, gamma (D, N) complex, omega (D,)) of one layer."""
    alpha = _sigmoid(_f64(sd, f"{prefix}.alpha")[..., 0])
    delta = _sigmoid(_f64(sd, f"{prefix}.delta")[..., 0])
    n = alpha.shape[1]
    base_angle = _sigmoid(_f64(sd, f"{prefix}.theta")[:, 0, 0]) * (2.0 * math.pi / n)
    phase = base_angle[:, None] * np.arange(1, n + 1, dtype=np.float64)[None, :]
    q = (1.0 - alpha * delta) * np.exp(1j * phase)
    gamma = (_f64(sd, f"{prefix}.gamma_real") + 1j * _f64(sd, f"{prefix}.gamma_imag")) / math.sqrt(
        n
    )
    return alpha, q, gamma, _f64(sd, f"{prefix}.omega")


def cema(
    sd: Mapping[str, Any], prefix: str, x: np.ndarray, h: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """x (B, D, L) real, h (B, D, N) complex → y (B, D, L), final h. Loop over time."""
    p, q, gamma, omega = cema_coefficients(sd, prefix)
    y = np.empty_like(x, dtype=np.float64)
    h = h.astype(np.complex128)
    for t in range(x.shape[-1]):
        h = q[None] * h + p[None] * x[:, :, t, None]
        y[:, :, t] = np.real((gamma[None] * h).sum(axis=-1)) + omega * x[:, :, t]
    return y, h


def rope_half_split(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """Rotate pairs (x[j], x[j + Dh/2]) of x (B, L, H, Dh) by positions (B, L)·inv_freq."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-np.arange(half, dtype=np.float64) / half)
    angle = positions[..., None].astype(np.float64) * inv_freq  # (B, L, half)
    cos, sin = np.cos(angle)[:, :, None, :], np.sin(angle)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def chunk_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    query_times: np.ndarray,
    key_times: np.ndarray,
    key_valid: np.ndarray,
    chunk: int,
) -> np.ndarray:
    """softmax(q·kᵀ + mask) v, one chunk block at a time as HF does.

    q (B, L, H, Dh), k (B, S, H, Dh), v (B, S, H, Dv), query_times (L,), key_times (S,),
    key_valid (B, S). Each query sees the keys of its chunk with time ≤ its own and valid.
    The arithmetic is SDPA's with an additive −inf mask: a row with no attendable key gives
    NaN (−inf − (−inf)), and a NaN key or value anywhere in the block poisons the block's
    rows (NaN + −inf, 0·NaN), so undefined outputs spread exactly as in HF.
    """
    b, length, h, _ = q.shape
    out = np.empty((b, length, h, v.shape[-1]))
    query_chunk, key_chunk = query_times // chunk, key_times // chunk
    with np.errstate(invalid="ignore"):
        for c in np.unique(query_chunk):
            qi, ki = query_chunk == c, key_chunk == c
            scores = np.einsum("blhd,bshd->bhls", q[:, qi], k[:, ki])
            allowed = key_times[ki][None, :] <= query_times[qi][:, None]  # (Lc, Sc)
            allowed = allowed[None, None] & key_valid[:, ki][:, None, None, :]
            scores = scores + np.where(allowed, 0.0, -np.inf)
            top = scores.max(axis=-1, keepdims=True)
            weights = np.exp(scores - top)
            probs = weights / weights.sum(axis=-1, keepdims=True)
            out[:, qi] = np.einsum("bhls,bshd->blhd", probs, v[:, ki])
    return out


def _attention_block(
    sd: Mapping[str, Any],
    dims: _Dims,
    i: int,
    x: np.ndarray,
    valid: np.ndarray,
    state: LayerState,
    start: int,
    variant: str,
) -> tuple[np.ndarray, LayerState]:
    pre = f"model.layers.{i}.attn"
    b, length, d = x.shape
    h_, dh, dv, eps = dims.heads, dims.dh, dims.dv, dims.eps
    w_tn, b_tn = _affine_or_identity(sd, f"{pre}.timenorm", d)
    x_tn, norm_state = timestep_norm(x, w_tn, b_tn, dims.groups, eps, valid, state.norm)

    cema_in = x_tn
    if variant == "latest":
        cema_in = np.where(valid[..., None], x_tn, 0.0)
    c, ema = cema(sd, f"{pre}.cema", cema_in.transpose(0, 2, 1), state.ema)
    c = c.transpose(0, 2, 1)

    rms_scale = _f64(sd, f"{pre}.rmsnorm.gamma") if f"{pre}.rmsnorm.gamma" in sd else 0.0
    mx = c / np.sqrt((c**2).mean(axis=-1, keepdims=True) + eps) * (1.0 + rms_scale)

    z = _dense(sd, f"{pre}.wz", mx).reshape(b, length, h_, dh)
    z = z / np.sqrt((z**2).mean(axis=-1, keepdims=True) + eps)
    qk_scale = (1.0 + _f64(sd, f"{pre}.gamma").reshape(2, h_, dh)) / math.sqrt(dh)
    qk_shift = _f64(sd, f"{pre}.beta").reshape(2, h_, dh)
    q = z * qk_scale[0] + qk_shift[0]
    k = z * qk_scale[1] + qk_shift[1]
    v = _silu(_dense(sd, f"{pre}.wv", x_tn)).reshape(b, length, h_, dv)
    r = _silu(_dense(sd, f"{pre}.wr", mx))

    times = start + np.arange(length)
    if variant == "latest":
        rope_pos = start + np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    else:
        rope_pos = np.broadcast_to(times, (b, length))
    q = rope_half_split(q, rope_pos, dims.rope_base)
    k = rope_half_split(k, rope_pos, dims.rope_base)

    n_cached = state.keys.shape[1]
    all_k = np.concatenate([state.keys, k], axis=1)
    all_v = np.concatenate([state.values, v], axis=1)
    key_times = np.concatenate([start - n_cached + np.arange(n_cached), times])
    key_valid = np.concatenate([np.ones((b, n_cached), bool), valid], axis=1)
    o = chunk_attention(q, all_k, all_v, times, key_times, key_valid, dims.chunk)
    if variant == "latest":
        o = np.where(valid[:, :, None, None], o, 0.0)

    gated = o.reshape(b, length, h_ * dv) * r
    y = x + _dense(sd, f"{pre}.wh1", mx) + _dense(sd, f"{pre}.wh2", gated)

    end = start + length
    keep = end % dims.chunk  # the cache holds the keys of the current chunk only
    new_keys = all_k[:, all_k.shape[1] - keep :] if keep else all_k[:, :0]
    new_values = all_v[:, all_v.shape[1] - keep :] if keep else all_v[:, :0]
    return y, LayerState(norm_state, ema, new_keys, new_values)


def _ffn(sd: Mapping[str, Any], dims: _Dims, i: int, y: np.ndarray, residual: np.ndarray):
    pre = f"model.layers.{i}.ffn"
    mu = y.mean(axis=-1, keepdims=True)
    var = ((y - mu) ** 2).mean(axis=-1, keepdims=True)
    u = (y - mu) / np.sqrt(var + dims.eps)
    if f"{pre}.norm.weight" in sd:
        u = u * _f64(sd, f"{pre}.norm.weight") + _f64(sd, f"{pre}.norm.bias")
    hidden = _silu(_dense(sd, f"{pre}.fc1", u))
    if dims.swiglu:
        hidden = hidden * _dense(sd, f"{pre}.fc3", u)
    out = _dense(sd, f"{pre}.fc2", hidden)
    if dims.rescale_nffn:
        out = out * (0.1 * 0.5**i)
    return residual + out


def hf_init_state(state_dict: Mapping[str, Any], cfg: Mapping[str, Any], batch: int) -> HFState:
    """A fresh stream (what HF uses when `past_key_values` is None)."""
    dims = _dims(state_dict, cfg)

    def layer() -> LayerState:
        return LayerState(
            NormState.fresh(batch, dims.groups),
            np.zeros((batch, dims.d, dims.n), np.complex128),
            np.zeros((batch, 0, dims.heads, dims.dh)),
            np.zeros((batch, 0, dims.heads, dims.dv)),
        )

    return HFState([layer() for _ in range(dims.layers)], NormState.fresh(batch, dims.groups), 0)


def hf_forward_cached(
    state_dict: Mapping[str, Any],
    cfg: Mapping[str, Any],
    tokens: np.ndarray,
    state: HFState,
    attention_mask: np.ndarray | None = None,
    variant: str = "spec",
) -> tuple[np.ndarray, HFState]:
    """Continues `state` with tokens (B, L) → float64 logits (B, L, V_out), new state."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    dims = _dims(state_dict, cfg)
    tokens = np.asarray(tokens)
    b, length = tokens.shape
    valid = (
        np.ones((b, length), bool)
        if attention_mask is None
        else np.asarray(attention_mask).astype(bool)
    )
    if attention_mask is not None and state.position != 0:
        raise ValueError("attention_mask is only supported from a fresh state")
    embed = _f64(state_dict, "model.embed.weight")
    x = embed[tokens]
    if dims.scale_emb:
        x = x * math.sqrt(dims.d)
    new_layers = []
    for i in range(dims.layers):
        y, layer_state = _attention_block(
            state_dict, dims, i, x, valid, state.layers[i], state.position, variant
        )
        x = _ffn(state_dict, dims, i, y, x)
        new_layers.append(layer_state)
    w_f, b_f = _affine_or_identity(state_dict, "model.norm", dims.d)
    x, final_norm = timestep_norm(x, w_f, b_f, dims.groups, dims.eps, valid, state.final_norm)
    head = _f64(state_dict, "lm_head.weight") if "lm_head.weight" in state_dict else embed
    logits = x @ head.T
    return logits, HFState(new_layers, final_norm, state.position + length)


def hf_forward(
    state_dict: Mapping[str, Any],
    cfg: Mapping[str, Any],
    tokens: np.ndarray,
    attention_mask: np.ndarray | None = None,
    variant: str = "spec",
) -> np.ndarray:
    """One-shot megalodon-hf logits, float64 (B, L, V_out).

    `cfg` needs num_layers, num_heads, chunk_size, norm_num_groups; optional norm_eps
    (1e-5), rope_base (None → 10000), rescale_nffn, scale_emb (False). Widths come from the
    state dict; SwiGLU is on iff `fc3` is present. `attention_mask` (B, L): 1 = valid.
    """
    batch = np.asarray(tokens).shape[0]
    logits, _ = hf_forward_cached(
        state_dict,
        cfg,
        tokens,
        hf_init_state(state_dict, cfg, batch),
        attention_mask,
        variant,
    )
    return logits
