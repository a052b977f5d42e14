"""The PyTorch state-dict layouts of Megalodon (spec §8): every key, its shape and how it
maps onto our parameter tree.

`hf_entries` describes megalodon-hf's ``MegalodonForCausalLM`` state dict, `upstream_entries`
the released world-size-one one; `megalodon.convert` applies them in both directions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from megalodon_flax.layers.rotary import rope_frequencies
from megalodon_flax.megalodon.config import MegalodonConfig

FORMATS = ("hf", "upstream")


def as_float32(x: Any) -> np.ndarray:
    return np.asarray(x).astype(np.float32)


def _qk_permutation(config: MegalodonConfig, source_layout: str) -> np.ndarray | None:
    """Index array `perm` (Z,) with ours[..., j] = source[..., perm[j]], or None if identity.

    Within each head, half-split coordinate j pairs with j + Dh/2 while adjacent coordinate 2j
    pairs with 2j+1: π(2j) = j, π(2j+1) = j + Dh/2 (spec §8.3).
    """
    if source_layout == config.rope_layout:
        return None
    dh, heads = config.head_dim, config.num_heads
    half = dh // 2
    within = np.empty(dh, np.int64)
    within[0::2] = np.arange(half)
    within[1::2] = np.arange(half) + half
    adjacent_from_half = np.concatenate([h * dh + within for h in range(heads)])
    if source_layout == "half_split":  # ours adjacent
        return adjacent_from_half
    return np.argsort(adjacent_from_half)  # ours half-split, source adjacent


def is_sensitive(path: tuple[str, ...]) -> bool:
    """Parameters kept float32 whatever the storage dtype (spec §9.2)."""
    sensitive_modules = {"cema", "timenorm", "rmsnorm", "norm"}
    return bool(sensitive_modules & set(path)) or path[-1] in ("gamma", "beta", "alpha")


def get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def has_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    try:
        get_path(tree, path)
    except (KeyError, TypeError):
        return False
    return True


def flat_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from flat_paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


class Entry:
    """One tensor of the PyTorch layout and how it relates to our parameter tree.

    `ours` is the parameter path (None for buffers and constants); `to_ours` / `from_ours`
    map the PyTorch array to ours and back; `default` builds the PyTorch array when ours does
    not exist (absent bias, buffers); `check` validates a PyTorch array that has no Flax
    counterpart (must be zero, buffer values).
    """

    def __init__(
        self,
        key: str,
        shape: tuple[int, ...],
        ours: tuple[str, ...] | None = None,
        to_ours: Callable[[np.ndarray], np.ndarray] = as_float32,
        from_ours: Callable[[np.ndarray], np.ndarray] = as_float32,
        default: Callable[[], np.ndarray] | None = None,
        check: Callable[[np.ndarray], str | None] | None = None,
        dtype: Any = None,
    ) -> None:
        self.key, self.shape, self.ours = key, shape, ours
        self.to_ours, self.from_ours = to_ours, from_ours
        self.default, self.check, self.dtype = default, check, dtype


def _zeros(shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
    return lambda: np.zeros(shape, np.float32)


def _must_be_zero(what: str) -> Callable[[np.ndarray], str | None]:
    def check(value: np.ndarray) -> str | None:
        if np.any(as_float32(value) != 0):
            return f"{what} is non-zero but the target topology has no such parameter"
        return None

    return check


def _must_equal(expected: np.ndarray, what: str) -> Callable[[np.ndarray], str | None]:
    def check(value: np.ndarray) -> str | None:
        if not np.allclose(as_float32(value), expected, rtol=2e-6, atol=2e-6):
            return f"{what} differs from the value this config implies"
        return None

    return check


def _linear(
    key: str,
    ours: tuple[str, ...],
    shape_out_in: tuple[int, int],
    perm: np.ndarray | None = None,
) -> Entry:
    """A PyTorch (out, in) weight ↔ our (in, out) kernel, optionally permuting outputs."""
    inverse = None if perm is None else np.argsort(perm)

    def to_ours(w: np.ndarray) -> np.ndarray:
        w = as_float32(w)
        return (w if perm is None else w[perm]).T

    def from_ours(k: np.ndarray) -> np.ndarray:
        w = as_float32(k).T
        return w if inverse is None else w[inverse]

    return Entry(key, shape_out_in, ours, to_ours, from_ours)


def _vector(
    key: str,
    ours: tuple[str, ...],
    shape: tuple[int, ...],
    perm: np.ndarray | None = None,
    axis: int = -1,
    offset: float = 0.0,
) -> Entry:
    """Identity (optionally permuted along `axis`, optionally shifted by `offset`)."""
    inverse = None if perm is None else np.argsort(perm)

    def to_ours(x: np.ndarray) -> np.ndarray:
        x = as_float32(x)
        x = x if perm is None else np.take(x, perm, axis=axis)
        return x - np.float32(offset) if offset else x

    def from_ours(x: np.ndarray) -> np.ndarray:
        x = as_float32(x)
        x = x if inverse is None else np.take(x, inverse, axis=axis)
        return x + np.float32(offset) if offset else x

    return Entry(key, shape, ours, to_ours, from_ours)


def _bias(
    key: str,
    ours: tuple[str, ...],
    width: int,
    present: bool,
    perm: np.ndarray | None = None,
) -> Entry:
    if present:
        return _vector(key, ours, (width,), perm)
    return Entry(key, (width,), None, default=_zeros((width,)), check=_must_be_zero(key))


def hf_entries(config: MegalodonConfig) -> list[Entry]:
    """The megalodon-hf keys (spec §8.1) of `config`, in state-dict order."""
    d, z, e, f = config.model_dim, config.z_dim, config.value_dim, config.ffn_hidden_dim
    n = config.cema_ndim
    perm = _qk_permutation(config, "half_split")
    entries = [
        _vector("model.embed.weight", ("model", "embed", "embedding"), (config.vocab_size, d))
    ]
    for i in range(config.num_layers):
        p, a, m = f"model.layers.{i}.", ("model", f"layers_{i}", "attn"), ("model", f"layers_{i}")
        if config.norm_affine:
            entries += [
                _vector(p + "attn.timenorm.weight", (*a, "timenorm", "weight"), (d,)),
                _vector(p + "attn.timenorm.bias", (*a, "timenorm", "bias"), (d,)),
            ]
        entries += [
            _vector(p + "attn.cema.alpha", (*a, "cema", "alpha"), (d, n, 1)),
            _vector(p + "attn.cema.delta", (*a, "cema", "delta"), (d, n, 1)),
            _vector(p + "attn.cema.theta", (*a, "cema", "theta"), (d, 1, 1)),
            _vector(p + "attn.cema.gamma_real", (*a, "cema", "gamma_real"), (d, n)),
            _vector(p + "attn.cema.gamma_imag", (*a, "cema", "gamma_imag"), (d, n)),
            _vector(p + "attn.cema.omega", (*a, "cema", "omega"), (d,)),
        ]
        if config.norm_affine:
            entries.append(_vector(p + "attn.rmsnorm.gamma", (*a, "rmsnorm", "gamma"), (d,)))
        for name, out_dim, in_dim, pm in (
            ("wz", z, d, perm),
            ("wv", e, d, None),
            ("wr", e, d, None),
            ("wh1", d, d, None),
            ("wh2", d, e, None),
        ):
            entries.append(
                _linear(f"{p}attn.{name}.weight", (*a, name, "kernel"), (out_dim, in_dim), pm)
            )
            entries.append(
                _bias(
                    f"{p}attn.{name}.bias",
                    (*a, name, "bias"),
                    out_dim,
                    config.linear_has_bias(name),
                    pm,
                )
            )
        entries += [
            _vector(p + "attn.gamma", (*a, "gamma"), (2, z), perm),
            _vector(p + "attn.beta", (*a, "beta"), (2, z), perm),
        ]
        if config.norm_affine:
            entries += [
                _vector(p + "ffn.norm.weight", (*m, "ffn", "norm", "weight"), (d,), offset=1.0),
                _vector(p + "ffn.norm.bias", (*m, "ffn", "norm", "bias"), (d,)),
            ]
        fcs = [("fc1", f, d), ("fc2", d, f)] + ([("fc3", f, d)] if config.swiglu else [])
        for name, out_dim, in_dim in fcs:
            entries.append(
                _linear(f"{p}ffn.{name}.weight", (*m, "ffn", name, "kernel"), (out_dim, in_dim))
            )
            entries.append(
                _bias(
                    f"{p}ffn.{name}.bias",
                    (*m, "ffn", name, "bias"),
                    out_dim,
                    config.linear_has_bias(name),
                )
            )
    if config.norm_affine:
        entries += [
            _vector("model.norm.weight", ("model", "norm", "weight"), (d,)),
            _vector("model.norm.bias", ("model", "norm", "bias"), (d,)),
        ]
    if config.tied:
        entries.append(
            _vector("lm_head.weight", ("model", "embed", "embedding"), (config.vocab_size, d))
        )
    else:
        entries.append(_linear("lm_head.weight", ("lm_head", "kernel"), (config.output_width, d)))
    return entries


def upstream_entries(config: MegalodonConfig) -> list[Entry]:
    """The released upstream keys (spec §8.4) of `config`."""
    d, z, e, f = config.model_dim, config.z_dim, config.value_dim, config.ffn_hidden_dim
    n, g = config.cema_ndim, config.norm_num_groups
    perm = _qk_permutation(config, "adjacent")
    freqs = np.asarray(rope_frequencies(config.head_dim, config.effective_rope_base))

    def priors(prefix: str) -> list[Entry]:
        return [
            Entry(
                prefix + ".prior_count",
                (),
                None,
                default=lambda: np.zeros((), np.int64),
                check=_must_be_zero(prefix + ".prior_count"),
                dtype=np.int64,
            ),
            Entry(
                prefix + ".prior_mean",
                (g,),
                None,
                default=_zeros((g,)),
                check=_must_be_zero(prefix + ".prior_mean"),
            ),
            Entry(
                prefix + ".prior_logv",
                (g,),
                None,
                default=_zeros((g,)),
                check=_must_be_zero(prefix + ".prior_logv"),
            ),
        ]

    entries = [
        _vector("embed.weight", ("model", "embed", "embedding"), (config.vocab_size, d)),
        Entry(
            "rope.freqs",
            (config.head_dim // 2,),
            None,
            default=lambda: freqs.copy(),
            check=_must_equal(freqs, "rope.freqs"),
        ),
    ]
    for i in range(config.num_layers):
        p, a, m = f"layers.{i}.", ("model", f"layers_{i}", "attn"), ("model", f"layers_{i}")
        entries += priors(p + "mega.timenorm")
        entries += [
            _vector(p + "mega.timenorm.weight", (*a, "timenorm", "weight"), (d,)),
            _vector(p + "mega.timenorm.bias", (*a, "timenorm", "bias"), (d,)),
            _vector(p + "mega.cema.alpha", (*a, "cema", "alpha"), (d, n, 1)),
            _vector(p + "mega.cema.delta", (*a, "cema", "delta"), (d, n, 1)),
            _vector(p + "mega.cema.theta", (*a, "cema", "theta"), (d, 1, 1)),
            Entry(p + "mega.cema.gamma", (d, n, 2), None),  # split into real/imag below
            Entry(
                p + "mega.cema.omega",
                (d, 1),
                (*a, "cema", "omega"),
                to_ours=lambda x: as_float32(x)[:, 0],
                from_ours=lambda x: as_float32(x)[:, None],
            ),
        ]
        if config.norm_affine:
            entries.append(_vector(p + "mega.rmsnorm.weight", (*a, "rmsnorm", "gamma"), (d,)))
        for name, out_dim, in_dim, pm in (
            ("wz", z, d, perm),
            ("wv", e, d, None),
            ("wr", e, d, None),
            ("wh1", d, d, None),
        ):
            entries.append(
                _linear(f"{p}mega.{name}.weight", (*a, name, "kernel"), (out_dim, in_dim), pm)
            )
            entries.append(_vector(f"{p}mega.{name}.bias", (*a, name, "bias"), (out_dim,), pm))
        entries.append(_linear(p + "mega.wh2.weight", (*a, "wh2", "kernel"), (d, e)))
        entries += [
            _vector(p + "mega.gamma", (*a, "gamma"), (2, z), perm),
            _vector(p + "mega.beta", (*a, "beta"), (2, z), perm),
        ]
        if config.norm_affine:
            entries += [
                _vector(p + "nffn.norm.weight", (*m, "ffn", "norm", "weight"), (d,)),
                _vector(p + "nffn.norm.bias", (*m, "ffn", "norm", "bias"), (d,)),
            ]
        fcs = [("fc1", f, d), ("fc2", d, f)] + ([("fc3", f, d)] if config.swiglu else [])
        for name, out_dim, in_dim in fcs:
            entries.append(
                _linear(f"{p}nffn.{name}.weight", (*m, "ffn", name, "kernel"), (out_dim, in_dim))
            )
        if config.rescale_nffn:
            entries.append(_vector(p + "nffn.alpha", (*m, "ffn", "alpha"), (d,)))
    entries += priors("output.final_norm")
    entries += [
        _vector("output.final_norm.weight", ("model", "norm", "weight"), (d,)),
        _vector("output.final_norm.bias", ("model", "norm", "bias"), (d,)),
    ]
    if config.tied:
        entries.append(
            _vector("output.output.weight", ("model", "embed", "embedding"), (config.vocab_size, d))
        )
    else:
        entries.append(
            _linear("output.output.weight", ("lm_head", "kernel"), (config.output_width, d))
        )
    return entries


def layout_entries(config: MegalodonConfig, fmt: str) -> list[Entry]:
    if fmt == "hf":
        return hf_entries(config)
    if fmt == "upstream":
        return upstream_entries(config)
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def expected_shapes(config: MegalodonConfig, fmt: str) -> dict[str, tuple[int, ...]]:
    """Key → shape of the state dict `fmt` for `config`, in state-dict order."""
    return {entry.key: entry.shape for entry in layout_entries(config, fmt)}
