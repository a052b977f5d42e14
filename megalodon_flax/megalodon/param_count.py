"""Parameter counts: the closed-form breakdown of spec §7 and a count of an actual tree."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

from megalodon_flax.megalodon.config import MegalodonConfig


def parameter_breakdown(config: MegalodonConfig) -> dict[str, int]:
    """Closed-form parameter counts per component (totals over all layers) and 'total'."""
    d, z, e, f, n = (
        config.model_dim,
        config.z_dim,
        config.value_dim,
        config.ffn_hidden_dim,
        config.cema_ndim,
    )
    layers = config.num_layers

    def bias(name: str, width: int) -> int:
        return width if config.linear_has_bias(name) else 0

    affine = config.norm_affine
    per_layer = {
        "timestep_norm": 2 * d,
        "cema": 4 * d * n + 2 * d,
        "rms_norm": d if affine else 0,
        "projections": (
            d * z
            + bias("wz", z)
            + 2 * d * e
            + bias("wv", e)
            + bias("wr", e)
            + d * d
            + bias("wh1", d)
            + e * d
            + bias("wh2", d)
        ),
        "qk_affine": 4 * z,
        "ffn_layer_norm": 2 * d if affine else 0,
        "ffn": (
            2 * d * f
            + bias("fc1", f)
            + bias("fc2", d)
            + ((d * f + bias("fc3", f)) if config.swiglu else 0)
        ),
        "ffn_rescale": d if config.rescale_nffn else 0,
    }
    breakdown = {name: layers * count for name, count in per_layer.items()}
    breakdown["per_layer"] = sum(per_layer.values())
    breakdown["embedding"] = config.vocab_size * d
    breakdown["final_norm"] = 2 * d
    breakdown["lm_head"] = 0 if config.tied else config.output_width * d
    breakdown["total"] = (
        breakdown["embedding"]
        + layers * breakdown["per_layer"]
        + breakdown["final_norm"]
        + breakdown["lm_head"]
    )
    return breakdown


def count_params(params: Any) -> int:
    """Number of scalars in a (possibly boxed) parameter tree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(params))))


def parameter_count(config: MegalodonConfig, params: Any | None = None) -> dict[str, int]:
    """Breakdown of `parameter_breakdown`; with `params`, also checks the actual tree agrees."""
    breakdown = parameter_breakdown(config)
    if params is not None:
        actual = count_params(params)
        if actual != breakdown["total"]:
            raise AssertionError(
                f"parameter tree has {actual} scalars, formula gives {breakdown['total']}"
            )
    return breakdown
