"""The bridge to megalodon-jax 0.2.2 (JAX + Equinox), shared by the tests and the benchmarks.

megalodon-jax follows the released (upstream) topology: no bias on wh2/fc1/fc2/fc3, explicit
`share_emb` tying, stored+1 scales for every norm (FFN LayerNorm included), adjacent-pair
RoPE, PyTorch (out, in) linear weights. So a Flax model built with
`bias_topology='upstream', tie_policy='explicit'` maps onto it tensor by tensor; only the
linear kernels are transposed.

`megalodon_jax_config` translates a `MegalodonConfig`: strictly for the parity tests (a mode
megalodon-jax cannot express raises), or as the closest peer for the benchmarks (same sizes
and dtypes, bfloat16 included; megalodon-jax keeps its upstream topology). The weight mapping
goes through megalodon-jax's native checkpoint names (`model.layers.{i}.attn.wz.weight`, ...),
then each tensor is written with `equinox.tree_at` into a model skeleton from
`equinox.filter_eval_shape`, so no megalodon-jax initializer runs and a tensor the mapping
forgot stays a `ShapeDtypeStruct` (detected by `is_fully_set`).

megalodon-jax is an optional dependency (the package never imports it): this module imports
it, and equinox, only when one of its functions is called.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from megalodon_flax.config_base import DTYPES
from megalodon_flax.megalodon.config import MegalodonConfig

if TYPE_CHECKING:
    from megalodon_jax import MegalodonConfig as MjaxConfig
    from megalodon_jax import MegalodonForCausalLM

_ATTN_LINEARS = ("wz", "wv", "wr", "wh1", "wh2")
_FFN_LINEARS = ("fc1", "fc2", "fc3")


def megalodon_jax_config(cfg: MegalodonConfig, *, strict: bool = True) -> MjaxConfig:
    """The megalodon-jax config with the hyper-parameters and dtypes of `cfg`.

    Args:
      cfg: our config.
      strict: require a config megalodon-jax computes exactly (upstream bias set and
        TimestepNorm, adjacent RoPE, float32), as the parity tests and the weight mapping do.
        With False (the benchmarks' peer) any bias topology and the bfloat16 dtypes pass:
        megalodon-jax then runs its own upstream topology at the same sizes.

    Raises:
      ValueError: with `strict`, if `cfg` uses a mode megalodon-jax cannot express.
    """
    import megalodon_jax

    if strict:
        unsupported = {
            "bias_topology": (cfg.bias_topology, "upstream"),
            "timestep_norm_variant": (cfg.timestep_norm_variant, "upstream"),
            "rope_layout": (cfg.rope_layout, "adjacent"),
            "param_dtype": (cfg.param_dtype, "float32"),
            "compute_dtype": (cfg.compute_dtype, "float32"),
        }
        for name, (value, required) in unsupported.items():
            if value != required:
                raise ValueError(f"megalodon-jax mapping needs {name}={required!r}, got {value!r}")
    return megalodon_jax.MegalodonConfig(
        vocab_size=cfg.vocab_size,
        model_dim=cfg.model_dim,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        z_dim=cfg.z_dim,
        value_dim=cfg.value_dim,
        ffn_hidden_dim=cfg.ffn_hidden_dim,
        cema_ndim=cfg.cema_ndim,
        chunk_size=cfg.chunk_size,
        norm_num_groups=cfg.norm_num_groups,
        norm_eps=cfg.norm_eps,
        rope_base=cfg.rope_base,
        swiglu=cfg.swiglu,
        rescale_nffn=cfg.rescale_nffn,
        scale_emb=cfg.scale_emb,
        share_emb=cfg.tied,
        norm_affine=cfg.norm_affine,
        output_size=cfg.output_size,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        init_mode=cfg.init_mode,
        param_dtype=DTYPES[cfg.param_dtype],
        compute_dtype=DTYPES[cfg.compute_dtype],
    )


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def megalodon_jax_tensors(params: Mapping[str, Any], cfg: MegalodonConfig) -> dict[str, np.ndarray]:
    """Our unboxed `params` (the 'params' collection) → megalodon-jax native name → array.

    Every leaf of `params` is consumed exactly once; a leftover or missing leaf raises.
    """
    megalodon_jax_config(cfg)
    flat = {k: np.asarray(v, np.float32) for k, v in _flatten(params).items()}
    out: dict[str, np.ndarray] = {}

    def take(*path: str) -> np.ndarray:
        if path not in flat:
            raise KeyError(f"parameter {'/'.join(path)} is missing from the Flax tree")
        return flat.pop(path)

    def put(name: str, value: np.ndarray) -> None:
        if name in out:
            raise ValueError(f"megalodon-jax tensor {name} written twice")
        out[name] = value

    put("model.embed.weight", take("model", "embed", "embedding"))
    for i in range(cfg.num_layers):
        layer, ours = f"model.layers.{i}", ("model", f"layers_{i}")
        attn = (*ours, "attn")
        for name in ("weight", "bias"):
            put(f"{layer}.attn.timenorm.{name}", take(*attn, "timenorm", name))
        for name in ("alpha", "delta", "theta", "gamma_real", "gamma_imag", "omega"):
            put(f"{layer}.attn.cema.{name}", take(*attn, "cema", name))
        if cfg.norm_affine:
            put(f"{layer}.attn.rmsnorm.gamma", take(*attn, "rmsnorm", "gamma"))
        for name in _ATTN_LINEARS:
            put(f"{layer}.attn.{name}.weight", take(*attn, name, "kernel").T)
            if cfg.linear_has_bias(name):
                put(f"{layer}.attn.{name}.bias", take(*attn, name, "bias"))
        put(f"{layer}.attn.gamma", take(*attn, "gamma"))
        put(f"{layer}.attn.beta", take(*attn, "beta"))
        ffn = (*ours, "ffn")
        if cfg.norm_affine:
            for name in ("weight", "bias"):
                put(f"{layer}.ffn.norm.{name}", take(*ffn, "norm", name))
        for name in _FFN_LINEARS:
            if name == "fc3" and not cfg.swiglu:
                continue
            put(f"{layer}.ffn.{name}.weight", take(*ffn, name, "kernel").T)
        if cfg.rescale_nffn:
            put(f"{layer}.ffn.alpha", take(*ffn, "alpha"))
    for name in ("weight", "bias"):
        put(f"model.norm.{name}", take("model", "norm", name))
    if not cfg.tied:
        put("lm_head.weight", take("lm_head", "kernel").T)
    if flat:
        raise ValueError(f"Flax parameters left unmapped: {sorted('/'.join(k) for k in flat)}")
    return out


def _selector(name: str):
    """'model.layers.1.attn.wz.weight' → function returning that node of the model."""
    parts = [int(p) if p.isdigit() else p for p in name.split(".")]

    def where(root: Any) -> Any:
        node = root
        for part in parts:
            node = node[part] if isinstance(part, int) else getattr(node, part)
        return node

    return where


def skeleton(cfg: MegalodonConfig) -> MegalodonForCausalLM:
    """A megalodon-jax model whose array leaves are `ShapeDtypeStruct` placeholders."""
    import equinox as eqx
    from megalodon_jax import MegalodonForCausalLM

    config = megalodon_jax_config(cfg)

    def construct(key: jax.Array) -> MegalodonForCausalLM:
        # The constructor turns constants into Python floats (sqrt(D) when scale_emb).
        with jax.ensure_compile_time_eval():
            return MegalodonForCausalLM(config, key=key)

    return eqx.filter_eval_shape(construct, jax.random.PRNGKey(0))


def load_tensors(model: MegalodonForCausalLM, tensors: Mapping[str, np.ndarray]):
    """Writes each named tensor into `model` (shape and dtype must match the slot)."""
    import equinox as eqx

    for name, value in tensors.items():
        where = _selector(name)
        slot = where(model)
        if tuple(slot.shape) != value.shape:
            raise ValueError(f"{name}: shape {value.shape} != megalodon-jax {tuple(slot.shape)}")
        model = eqx.tree_at(where, model, jnp.asarray(value, slot.dtype))
    return model


def is_fully_set(model: MegalodonForCausalLM) -> bool:
    """True when no leaf of `model` is still a placeholder."""
    return not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(model))


def to_megalodon_jax(params: Mapping[str, Any], cfg: MegalodonConfig) -> MegalodonForCausalLM:
    """A megalodon-jax model computing the same function as `MegalodonLM(cfg)` with `params`."""
    model = load_tensors(skeleton(cfg), megalodon_jax_tensors(params, cfg))
    if not is_fully_set(model):
        raise ValueError("some megalodon-jax parameters were not set")
    return model
