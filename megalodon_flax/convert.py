"""Weight conversion between our Flax parameters and PyTorch Megalodon state dicts.

Two PyTorch layouts are supported (spec §8):

* ``hf``: megalodon-hf's ``MegalodonForCausalLM`` state dict (biases on every internal linear,
  FFN LayerNorm stored as a direct scale, half-split RoPE coordinates of Z, head tied
  whenever its width equals the vocabulary);
* ``upstream``: the released world-size-one state dict (no bias on wh2/fc1-3, CEMA gamma as a
  trailing (…, 2) axis, omega as (D, 1), TimestepNorm prior buffers, ``rope.freqs``).

State dicts are ``{name: numpy array}``. ``.safetensors`` files need only ``safetensors`` and
NumPy; ``.pt``/``.bin`` files need torch and are read with ``weights_only=True`` (no pickle
code runs). Loading checks every key, shape and dtype and reports all problems at once.

Command line:
  python -m megalodon_flax.convert --workdir=runs/megalodon --to=hf --out=model.safetensors
  python -m megalodon_flax.convert --from=hf --in=model.safetensors \\
      --config=configs/megalodon.py --workdir=runs/imported
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np

from megalodon_flax.config import MegalodonConfig
from megalodon_flax.model.rotary import rope_frequencies

StateDict = dict[str, np.ndarray]
Params = dict[str, Any]
FORMATS = ("hf", "upstream")
_ACCEPTED_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16))
_TIED_KEYS = {
    "hf": ("model.embed.weight", "lm_head.weight"),
    "upstream": ("embed.weight", "output.output.weight"),
}


class ConversionError(ValueError):
    """A state dict does not fit the model (lists every problem) or cannot be exported."""


# --------------------------------------------------------------------------- helpers
def _f32(x: Any) -> np.ndarray:
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


def _is_sensitive(path: tuple[str, ...]) -> bool:
    """Parameters kept float32 whatever the storage dtype (spec §9.2)."""
    sensitive_modules = {"cema", "timenorm", "rmsnorm", "norm"}
    return bool(sensitive_modules & set(path)) or path[-1] in ("gamma", "beta", "alpha")


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _has(tree: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    try:
        _get(tree, path)
    except (KeyError, TypeError):
        return False
    return True


def _flat_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flat_paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


# --------------------------------------------------------------------------- the mapping
class _Entry:
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
        to_ours: Callable[[np.ndarray], np.ndarray] = _f32,
        from_ours: Callable[[np.ndarray], np.ndarray] = _f32,
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
        if np.any(_f32(value) != 0):
            return f"{what} is non-zero but the target topology has no such parameter"
        return None

    return check


def _must_equal(expected: np.ndarray, what: str) -> Callable[[np.ndarray], str | None]:
    def check(value: np.ndarray) -> str | None:
        if not np.allclose(_f32(value), expected, rtol=2e-6, atol=2e-6):
            return f"{what} differs from the value this config implies"
        return None

    return check


def _linear(
    key: str,
    ours: tuple[str, ...],
    shape_out_in: tuple[int, int],
    perm: np.ndarray | None = None,
) -> _Entry:
    """A PyTorch (out, in) weight ↔ our (in, out) kernel, optionally permuting outputs."""
    inverse = None if perm is None else np.argsort(perm)

    def to_ours(w: np.ndarray) -> np.ndarray:
        w = _f32(w)
        return (w if perm is None else w[perm]).T

    def from_ours(k: np.ndarray) -> np.ndarray:
        w = _f32(k).T
        return w if inverse is None else w[inverse]

    return _Entry(key, shape_out_in, ours, to_ours, from_ours)


def _vector(
    key: str,
    ours: tuple[str, ...],
    shape: tuple[int, ...],
    perm: np.ndarray | None = None,
    axis: int = -1,
    offset: float = 0.0,
) -> _Entry:
    """Identity (optionally permuted along `axis`, optionally shifted by `offset`)."""
    inverse = None if perm is None else np.argsort(perm)

    def to_ours(x: np.ndarray) -> np.ndarray:
        x = _f32(x)
        x = x if perm is None else np.take(x, perm, axis=axis)
        return x - np.float32(offset) if offset else x

    def from_ours(x: np.ndarray) -> np.ndarray:
        x = _f32(x)
        x = x if inverse is None else np.take(x, inverse, axis=axis)
        return x + np.float32(offset) if offset else x

    return _Entry(key, shape, ours, to_ours, from_ours)


def _bias(
    key: str,
    ours: tuple[str, ...],
    width: int,
    present: bool,
    perm: np.ndarray | None = None,
) -> _Entry:
    if present:
        return _vector(key, ours, (width,), perm)
    return _Entry(key, (width,), None, default=_zeros((width,)), check=_must_be_zero(key))


def hf_entries(config: MegalodonConfig) -> list[_Entry]:
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


def upstream_entries(config: MegalodonConfig) -> list[_Entry]:
    """The released upstream keys (spec §8.4) of `config`."""
    d, z, e, f = config.model_dim, config.z_dim, config.value_dim, config.ffn_hidden_dim
    n, g = config.cema_ndim, config.norm_num_groups
    perm = _qk_permutation(config, "adjacent")
    freqs = np.asarray(rope_frequencies(config.head_dim, config.effective_rope_base))

    def priors(prefix: str) -> list[_Entry]:
        return [
            _Entry(
                prefix + ".prior_count",
                (),
                None,
                default=lambda: np.zeros((), np.int64),
                check=_must_be_zero(prefix + ".prior_count"),
                dtype=np.int64,
            ),
            _Entry(
                prefix + ".prior_mean",
                (g,),
                None,
                default=_zeros((g,)),
                check=_must_be_zero(prefix + ".prior_mean"),
            ),
            _Entry(
                prefix + ".prior_logv",
                (g,),
                None,
                default=_zeros((g,)),
                check=_must_be_zero(prefix + ".prior_logv"),
            ),
        ]

    entries = [
        _vector("embed.weight", ("model", "embed", "embedding"), (config.vocab_size, d)),
        _Entry(
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
            _Entry(p + "mega.cema.gamma", (d, n, 2), None),  # split into real/imag below
            _Entry(
                p + "mega.cema.omega",
                (d, 1),
                (*a, "cema", "omega"),
                to_ours=lambda x: _f32(x)[:, 0],
                from_ours=lambda x: _f32(x)[:, None],
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


def _entries(config: MegalodonConfig, fmt: str) -> list[_Entry]:
    if fmt == "hf":
        return hf_entries(config)
    if fmt == "upstream":
        return upstream_entries(config)
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def expected_shapes(config: MegalodonConfig, fmt: str) -> dict[str, tuple[int, ...]]:
    """Key → shape of the state dict `fmt` for `config`, in state-dict order."""
    return {entry.key: entry.shape for entry in _entries(config, fmt)}


# --------------------------------------------------------------------------- import
def _dropped_parameters(config: MegalodonConfig, fmt: str) -> list[tuple[str, ...]]:
    """Our parameters with no counterpart in `fmt` (filled on import, checked on export)."""
    dropped = []
    for i in range(config.num_layers):
        if config.rescale_nffn and fmt == "hf":
            dropped.append(("model", f"layers_{i}", "ffn", "alpha"))
        if fmt == "upstream":
            for name in ("wh2",):
                if config.linear_has_bias(name):
                    dropped.append(("model", f"layers_{i}", "attn", name, "bias"))
            for name in ("fc1", "fc2", "fc3"):
                if config.linear_has_bias(name) and (name != "fc3" or config.swiglu):
                    dropped.append(("model", f"layers_{i}", "ffn", name, "bias"))
        if not config.norm_affine and fmt == "hf":
            for name in ("weight", "bias"):
                dropped.append(("model", f"layers_{i}", "attn", "timenorm", name))
    if not config.norm_affine and fmt == "hf":
        dropped += [("model", "norm", "weight"), ("model", "norm", "bias")]
    return dropped


def _dropped_value(path: tuple[str, ...], config: MegalodonConfig) -> np.ndarray:
    if path[-1] == "alpha":  # FFN rescale, a constant in megalodon-hf
        layer = int(path[1].split("_")[1])
        return np.full((config.model_dim,), 0.1 * 0.5**layer, np.float32)
    width = config.model_dim if path[-2] != "fc1" and path[-2] != "fc3" else config.ffn_hidden_dim
    return np.zeros((width,), np.float32)


def from_state_dict(state_dict: Mapping[str, Any], config: MegalodonConfig, fmt: str) -> Params:
    """Builds our (unboxed) parameter tree from a PyTorch state dict.

    Args:
      state_dict: name → array (NumPy, or anything `np.asarray` accepts), fp32 or bf16.
      config: the model configuration the weights are for.
      fmt: "hf" or "upstream".

    Returns:
      The 'params' collection: sensitive parameters float32, others `config.param_dtype`.

    Raises:
      ConversionError: listing every missing, unexpected and mismatched entry at once.
    """
    entries = _entries(config, fmt)
    expected = {entry.key for entry in entries}
    given = {k: np.asarray(v) for k, v in state_dict.items()}
    problems: list[str] = []
    tied_pair = _TIED_KEYS[fmt]
    if config.tied:
        # Files written through safetensors may hold only one of the two tied tensors.
        present = [k for k in tied_pair if k in given]
        if len(present) == 1:
            given[tied_pair[1 - tied_pair.index(present[0])]] = given[present[0]]
    missing = sorted(expected - set(given))
    unexpected = sorted(set(given) - expected)
    problems += [f"missing: {k}" for k in missing]
    problems += [f"unexpected: {k}" for k in unexpected]
    for entry in entries:
        if entry.key not in given:
            continue
        value = given[entry.key]
        if tuple(value.shape) != entry.shape:
            problems.append(
                f"shape mismatch: {entry.key} has {tuple(value.shape)}, expected {entry.shape}"
            )
            continue
        if entry.dtype is None and value.dtype not in _ACCEPTED_DTYPES:
            problems.append(
                f"dtype mismatch: {entry.key} is {value.dtype}, expected float32 or bfloat16"
            )
            continue
        if entry.check is not None:
            message = entry.check(value)
            if message:
                problems.append(message)
    heads_differ = (
        config.tied
        and not problems
        and not np.array_equal(_f32(given[tied_pair[0]]), _f32(given[tied_pair[1]]))
    )
    if heads_differ:
        problems.append(
            f"{tied_pair[1]} differs from {tied_pair[0]} but this config ties the head "
            "(set tie_policy='explicit' to load an untied head)"
        )
    if problems:
        raise ConversionError(
            f"state dict ({fmt} layout) does not fit the model ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems)
        )

    params: Params = {}
    for entry in entries:
        if entry.ours is not None and not (config.tied and entry.key == tied_pair[1]):
            _set(params, entry.ours, entry.to_ours(given[entry.key]))
    if fmt == "upstream":
        for i in range(config.num_layers):
            gamma = _f32(given[f"layers.{i}.mega.cema.gamma"])
            cema = ("model", f"layers_{i}", "attn", "cema")
            _set(params, (*cema, "gamma_real"), gamma[..., 0].copy())
            _set(params, (*cema, "gamma_imag"), gamma[..., 1].copy())
    for path in _dropped_parameters(config, fmt):
        _set(params, path, _dropped_value(path, config))
    return _cast_params(params, config)


def _cast_params(params: Params, config: MegalodonConfig) -> Params:
    storage = (
        np.dtype(config.param_dtype)
        if config.param_dtype == "float32"
        else np.dtype(ml_dtypes.bfloat16)
    )
    out: Params = {}
    for path in _flat_paths(params):
        value = _get(params, path)
        _set(out, path, value.astype(np.float32 if _is_sensitive(path) else storage))
    return out


# --------------------------------------------------------------------------- export
def to_state_dict(
    params: Mapping[str, Any], config: MegalodonConfig, fmt: str, dtype: str = "float32"
) -> StateDict:
    """Exports our parameters as a PyTorch state dict of NumPy arrays.

    Args:
      params: the 'params' collection (boxed or not).
      config: its configuration.
      fmt: "hf" or "upstream".
      dtype: "float32" (default) or "bfloat16"; with bf16, CEMA, norm, Q/K affine and FFN
        rescale parameters stay float32.

    Raises:
      ConversionError: when the target layout cannot represent the parameters exactly
        (a non-zero bias the layout lacks, a trained FFN rescale for megalodon-hf, an untied
        head that megalodon-hf would tie).
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    params = jax.device_get(nn.unbox(params))
    if isinstance(params, Mapping) and "params" in params:
        params = params["params"]
    problems = []
    for path in _dropped_parameters(config, fmt):
        if _has(params, path) and not np.array_equal(
            _f32(_get(params, path)), _dropped_value(path, config)
        ):
            problems.append(f"{'/'.join(path)} has values the {fmt} layout cannot hold")
    if fmt == "hf" and not config.tied and config.output_width == config.vocab_size:
        problems.append(
            "megalodon-hf ties the LM head whenever output width == vocab size, but this model's "
            "head is untied (tie_policy='explicit'); HF would replace it by the embedding"
        )
    if problems:
        raise ConversionError(f"cannot export to {fmt} exactly:\n  " + "\n  ".join(problems))
    out: StateDict = {}
    for entry in _entries(config, fmt):
        if entry.ours is not None:
            value = entry.from_ours(_get(params, entry.ours))
        elif entry.key.endswith("cema.gamma"):
            cema = _get(params, ("model", f"layers_{entry.key.split('.')[1]}", "attn", "cema"))
            value = np.stack([_f32(cema["gamma_real"]), _f32(cema["gamma_imag"])], axis=-1)
        else:
            value = entry.default()
        if entry.dtype is not None:
            value = value.astype(entry.dtype)
        elif dtype == "bfloat16" and not _export_sensitive(entry.key):
            value = value.astype(ml_dtypes.bfloat16)
        out[entry.key] = np.asarray(value, order="C")
    return out


def _export_sensitive(key: str) -> bool:
    parts = key.split(".")
    names = {"cema", "timenorm", "rmsnorm", "norm", "final_norm", "freqs"}
    return bool(names & set(parts)) or parts[-1] in ("gamma", "beta", "alpha")


# --------------------------------------------------------------------------- files
def save_state_dict(
    state_dict: Mapping[str, np.ndarray], path: str, metadata: dict[str, str] | None = None
) -> None:
    """Writes a `.safetensors` file atomically (NumPy only)."""
    from safetensors.numpy import save_file

    tmp = f"{path}.tmp"
    save_file({k: np.asarray(v, order="C") for k, v in state_dict.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def load_state_dict(path: str) -> StateDict:
    """Reads `.safetensors` (NumPy only) or `.pt`/`.bin`/`.pth` (torch, weights_only=True)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    if path.endswith((".pt", ".bin", ".pth")):
        try:
            import torch
        except ImportError as err:
            raise ImportError(
                f"reading {path} needs torch; install it or convert the file to .safetensors"
            ) from err
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(raw, Mapping) and "model" in raw and isinstance(raw["model"], Mapping):
            raw = raw["model"]
        out = {}
        for key, tensor in raw.items():
            if tensor.dtype == torch.bfloat16:
                out[key] = tensor.float().numpy().astype(ml_dtypes.bfloat16)
            else:
                out[key] = tensor.numpy()
        return out
    raise ValueError(f"unsupported checkpoint extension: {path} (.safetensors, .pt, .bin, .pth)")


# --------------------------------------------------------------------------- command line
def _load_config_file(spec: str) -> Any:
    """`path/to/config.py[:arg]` → its `get_config()` (or `get_config(arg)`)."""
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} not found")
    module_spec = importlib.util.spec_from_file_location("_convert_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def export_workdir(workdir: str, fmt: str, out: str, dtype: str = "float32") -> StateDict:
    """Writes the newest checkpoint of a training workdir as a `fmt` state dict to `out`."""
    import json

    from megalodon_flax.workdir import load_trained_run

    run = load_trained_run(workdir)
    state_dict = to_state_dict(run.params, run.model_config, fmt, dtype)
    metadata = {
        "format": fmt,
        "step": str(run.step),
        "megalodon_flax_config": json.dumps(run.model_config.to_dict()),
    }
    save_state_dict(state_dict, out, metadata)
    return state_dict


def import_to_workdir(in_path: str, fmt: str, config: Any, workdir: str) -> int:
    """Writes PyTorch weights as step-0 orbax checkpoint of a new training workdir.

    The checkpoint holds the imported parameters with a fresh optimizer state, so that
    `main.py` (fine-tuning), `megalodon_flax.sample` and `megalodon_flax.evaluate` use it.

    Returns:
      The number of imported parameters.
    """
    from etils import epath

    from megalodon_flax import checkpointing, train

    model_config = train.validate_config(config)
    params = from_state_dict(load_state_dict(in_path), model_config, fmt)
    target = epath.Path(workdir)
    if (target / checkpointing.CHECKPOINT_SUBDIR).exists() and any(
        (target / checkpointing.CHECKPOINT_SUBDIR).iterdir()
    ):
        raise FileExistsError(f"{target} already holds checkpoints; choose a new --workdir")
    train.validate_workdir(target)
    target.mkdir(parents=True, exist_ok=True)
    setup = train.setup_training(config)
    state = setup.init_state()
    state = state.replace(
        params=jax.tree.map(
            lambda old, new: jax.device_put(np.asarray(new).astype(old.dtype), old.sharding),
            state.params,
            params,
        )
    )
    checkpointing.save_config(config, target)
    manager = checkpointing.create_manager(target, max_to_keep=1, async_save=False)
    try:
        checkpointing.save(
            manager,
            0,
            state,
            {"step": 0, "train_iterator": {"step": 0}},
            {"model": model_config.to_dict(), "seq_len": config.seq_len},
        )
        manager.wait_until_finished()
    finally:
        manager.close()
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m megalodon_flax.convert",
        description="Convert between training workdirs and PyTorch Megalodon state dicts.",
    )
    parser.add_argument("--workdir", required=True, help="training workdir (read or written)")
    parser.add_argument("--to", choices=FORMATS, help="export the workdir to this layout")
    parser.add_argument("--out", help="output .safetensors file (with --to)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--from", dest="source", choices=FORMATS, help="import this layout")
    parser.add_argument("--in", dest="in_path", help=".safetensors/.pt/.bin file (with --from)")
    parser.add_argument("--config", help="config file of the run to create (with --from)")
    args = parser.parse_args(argv)
    if (args.to is None) == (args.source is None):
        parser.error("give exactly one of --to (export) or --from (import)")
    try:
        if args.to:
            if not args.out:
                parser.error("--to needs --out")
            state_dict = export_workdir(args.workdir, args.to, args.out, args.dtype)
            print(f"wrote {len(state_dict)} tensors ({args.to} layout) to {args.out}")
        else:
            if not args.in_path or not args.config:
                parser.error("--from needs --in and --config")
            count = import_to_workdir(
                args.in_path, args.source, _load_config_file(args.config), args.workdir
            )
            print(f"imported {count:,} parameters into {args.workdir} (checkpoint step 0)")
    except (ConversionError, FileNotFoundError, FileExistsError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
