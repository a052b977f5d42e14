"""Weight conversion between our Flax parameters and PyTorch Megalodon state dicts.

Two PyTorch layouts are supported (spec §8):

* ``hf``: megalodon-hf's ``MegalodonForCausalLM`` state dict (biases on every internal linear,
  FFN LayerNorm stored as a direct scale, half-split RoPE coordinates of Z, head tied
  whenever its width equals the vocabulary);
* ``upstream``: the released world-size-one state dict (no bias on wh2/fc1-3, CEMA gamma as a
  trailing (…, 2) axis, omega as (D, 1), TimestepNorm prior buffers, ``rope.freqs``).

State dicts are ``{name: numpy array}``. ``.safetensors`` files need only ``safetensors`` and
NumPy; ``.pt``/``.bin`` files need torch and are read with ``weights_only=True`` (no pickle
code runs). A Hugging Face model directory (``model.safetensors`` + ``config.json``, what
megalodon-hf's ``from_pretrained`` loads) is written by `save_hf_directory` and read by
`load_state_dict`. Loading checks every key, shape and dtype, and that every value is
finite, and reports all problems at once; a file that cannot be read is named in the error.
Training workdirs are exported and imported by `training.conversion` (command line:
`python -m megalodon_flax.cli.convert`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np

from megalodon_flax.megalodon import layer_stack
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
def _non_finite(name: str, value: Any) -> str | None:
    """`non-finite values: name holds ...` when a float array holds NaN or infinity."""
    value = np.asarray(value)
    if value.dtype.kind in "iub":
        return None
    value = as_float32(value)
    nan, inf = int(np.isnan(value).sum()), int(np.isinf(value).sum())
    if not nan and not inf:
        return None
    found = " and ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "inf")) if n)
    return f"non-finite values: {name} holds {found} of {value.size} values"


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
      The 'params' collection: sensitive parameters float32, others `config.param_dtype`,
      in the layer layout of `config` (stacked for `scan_layers`).

    Raises:
      ConversionError: listing every missing, unexpected and mismatched entry at once
        (wrong shape, a dtype other than float32/bfloat16, NaN or infinity, ...).
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
        if entry.dtype is not None and value.dtype.kind not in "iu":
            problems.append(f"dtype mismatch: {entry.key} is {value.dtype}, expected an integer")
            continue
        message = _non_finite(entry.key, value)
        if message:
            problems.append(message)
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
    return layer_stack.to_layout(_cast_params(params, config), config.scan_layers)


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
      params: the 'params' collection (boxed or not; either layer layout).
      config: its configuration.
      fmt: "hf" or "upstream".
      dtype: "float32" (default) or "bfloat16"; with bf16, CEMA, norm, Q/K affine and FFN
        rescale parameters stay float32.

    Raises:
      ConversionError: when the target layout cannot represent the parameters exactly
        (a non-zero bias the layout lacks, a trained FFN rescale for megalodon-hf, an untied
        head that megalodon-hf would tie), or a parameter holds NaN or infinity.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    params = jax.device_get(nn.unbox(params))
    if isinstance(params, Mapping) and "params" in params:
        params = params["params"]
    params = layer_stack.to_layout(params, scan_layers=False)
    problems = []
    for path in _dropped_parameters(config, fmt):
        if has_path(params, path) and not np.array_equal(
            as_float32(get_path(params, path)), _dropped_value(path, config)
        ):
            problems.append(f"{'/'.join(path)} has values the {fmt} layout cannot hold")
    for path in flat_paths(params):
        message = _non_finite("/".join(path), get_path(params, path))
        if message:
            problems.append(message)
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
HF_WEIGHTS_NAME = "model.safetensors"
HF_CONFIG_NAME = "config.json"
_TORCH_SUFFIXES = (".pt", ".bin", ".pth")
# Weight files of a Hugging Face model directory, in the order transformers prefers them.
_DIRECTORY_WEIGHTS = (HF_WEIGHTS_NAME, "model.safetensors.index.json", "pytorch_model.bin")


def save_state_dict(
    state_dict: Mapping[str, np.ndarray], path: str, metadata: dict[str, str] | None = None
) -> None:
    """Writes a `.safetensors` file atomically (NumPy only); a failed write leaves no file.

    `metadata` should hold `format: "pt"`: transformers refuses any other value.
    """
    from safetensors.numpy import save_file

    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        arrays = {k: np.asarray(v, order="C") for k, v in state_dict.items()}
        save_file(arrays, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_hf_directory(
    state_dict: Mapping[str, np.ndarray],
    hf_config: Mapping[str, Any],
    directory: str,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Writes a Hugging Face model directory: `model.safetensors` + `config.json`.

    megalodon-hf's `MegalodonForCausalLM.from_pretrained(directory)` loads it. Both files are
    written into a temporary folder beside `directory` and then moved in, so a failed export
    leaves nothing behind; an existing directory keeps its other files (a tokenizer, say).

    Returns:
        The files of `directory` that existed before and were replaced.

    Raises:
        ConversionError: `directory` is a file, or holds other weight files that
            transformers would load instead (or as well).
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ConversionError(f"{directory} is a file; the hf export writes a directory")
    stale = [n for n in _DIRECTORY_WEIGHTS[1:] if os.path.exists(os.path.join(directory, n))]
    if stale:
        raise ConversionError(
            f"{directory} holds {stale}, which transformers would load instead of the new "
            f"{HF_WEIGHTS_NAME}; export into a new directory"
        )
    parent, name = os.path.split(os.path.abspath(directory))
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        save_state_dict(state_dict, os.path.join(tmp, HF_WEIGHTS_NAME), metadata)
        with open(os.path.join(tmp, HF_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(dict(hf_config), f, indent=2, sort_keys=True)
            f.write("\n")
        if not os.path.exists(directory):
            os.rename(tmp, directory)
            return []
        replaced = []
        for file_name in (HF_WEIGHTS_NAME, HF_CONFIG_NAME):
            target = os.path.join(directory, file_name)
            if os.path.exists(target):
                replaced.append(file_name)
            os.replace(os.path.join(tmp, file_name), target)
        return replaced
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def weights_file(path: str) -> str:
    """The weight file of `path`: itself, or the one a Hugging Face directory holds.

    Raises:
        FileNotFoundError: No such path, or a directory without a weight file.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if not os.path.isdir(path):
        return path
    for name in _DIRECTORY_WEIGHTS:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f"{path} is a directory without any of {list(_DIRECTORY_WEIGHTS)}")


def load_state_dict(path: str) -> StateDict:
    """Reads `.safetensors` (NumPy only), `.pt`/`.bin`/`.pth` (torch, weights_only=True), or a
    Hugging Face model directory (`model.safetensors`, a sharded index, `pytorch_model.bin`).

    Raises:
        FileNotFoundError: No such file, or a directory without weights.
        ConversionError: A file that cannot be read (not safetensors, truncated, not a state
            dict, ...); the message names it.
    """
    path = weights_file(path)
    if path.endswith(".safetensors.index.json"):
        return _load_sharded(path)
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    if path.endswith(_TORCH_SUFFIXES):
        return _load_torch(path)
    raise ValueError(
        f"unsupported checkpoint extension: {path} (.safetensors, .pt, .bin, .pth or a "
        "Hugging Face model directory)"
    )


def _unreadable(path: str, what: str, err: BaseException) -> ConversionError:
    first_line = (str(err).strip().splitlines() or [""])[0]
    return ConversionError(f"{path} is not a readable {what} ({type(err).__name__}: {first_line})")


def _load_safetensors(path: str) -> StateDict:
    from safetensors.numpy import load_file

    try:
        return dict(load_file(path))
    except Exception as err:  # SafetensorError, OSError, ...: name the file, whatever it is
        raise _unreadable(path, "safetensors file", err) from err


def _load_sharded(path: str) -> StateDict:
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise _unreadable(path, "safetensors index", err) from err
    out: StateDict = {}
    for shard in shards:
        out.update(_load_safetensors(os.path.join(os.path.dirname(path), shard)))
    return out


def _load_torch(path: str) -> StateDict:
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"reading {path} needs torch; install it or convert the file to .safetensors"
        ) from err
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # bad zip, truncated, disallowed pickle: name the file
        raise _unreadable(path, "PyTorch state dict", err) from err
    for wrapper in ("model", "state_dict"):
        if isinstance(raw, Mapping) and isinstance(raw.get(wrapper), Mapping):
            raw = raw[wrapper]
    if not isinstance(raw, Mapping):
        raise ConversionError(f"{path} holds a {type(raw).__name__}, not a state dict")
    out = {}
    for key, tensor in raw.items():
        if not isinstance(tensor, torch.Tensor):
            raise ConversionError(
                f"{path}: {key!r} is a {type(tensor).__name__}, not a tensor (not a state dict?)"
            )
        if tensor.dtype == torch.bfloat16:
            out[key] = tensor.detach().float().numpy().astype(ml_dtypes.bfloat16)
        else:
            out[key] = tensor.detach().numpy()
    return out
