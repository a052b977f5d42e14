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
Training workdirs are exported and imported by `training.conversion` (command line:
`python -m megalodon_flax.cli.convert`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np

from megalodon_flax.megalodon.config import MegalodonConfig
from megalodon_flax.megalodon.state_dict_layout import (
    as_float32,
    flat_paths,
    get_path,
    has_path,
    is_sensitive,
    layout_entries,
    set_path,
)

StateDict = dict[str, np.ndarray]
Params = dict[str, Any]
_ACCEPTED_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16))
_TIED_KEYS = {
    "hf": ("model.embed.weight", "lm_head.weight"),
    "upstream": ("embed.weight", "output.output.weight"),
}


class ConversionError(ValueError):
    """A state dict does not fit the model (lists every problem) or cannot be exported."""


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
    entries = layout_entries(config, fmt)
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
        and not np.array_equal(as_float32(given[tied_pair[0]]), as_float32(given[tied_pair[1]]))
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
            set_path(params, entry.ours, entry.to_ours(given[entry.key]))
    if fmt == "upstream":
        for i in range(config.num_layers):
            gamma = as_float32(given[f"layers.{i}.mega.cema.gamma"])
            cema = ("model", f"layers_{i}", "attn", "cema")
            set_path(params, (*cema, "gamma_real"), gamma[..., 0].copy())
            set_path(params, (*cema, "gamma_imag"), gamma[..., 1].copy())
    for path in _dropped_parameters(config, fmt):
        set_path(params, path, _dropped_value(path, config))
    return _cast_params(params, config)


def _cast_params(params: Params, config: MegalodonConfig) -> Params:
    storage = (
        np.dtype(config.param_dtype)
        if config.param_dtype == "float32"
        else np.dtype(ml_dtypes.bfloat16)
    )
    out: Params = {}
    for path in flat_paths(params):
        value = get_path(params, path)
        set_path(out, path, value.astype(np.float32 if is_sensitive(path) else storage))
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
        if has_path(params, path) and not np.array_equal(
            as_float32(get_path(params, path)), _dropped_value(path, config)
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
    for entry in layout_entries(config, fmt):
        if entry.ours is not None:
            value = entry.from_ours(get_path(params, entry.ours))
        elif entry.key.endswith("cema.gamma"):
            cema = get_path(params, ("model", f"layers_{entry.key.split('.')[1]}", "attn", "cema"))
            value = np.stack(
                [as_float32(cema["gamma_real"]), as_float32(cema["gamma_imag"])], axis=-1
            )
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
