"""Rematerialization policies for the blocks of both model families.

A policy names what the backward pass may keep from the forward pass of a block; the rest
is recomputed. "none" keeps everything (no remat), "full" keeps only the block's inputs,
"save_dots" keeps every matmul output and "save_dots_no_batch" keeps the matmul outputs
without batch dimensions (the projections, not the attention score products).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def rematted(
    module_class: type[nn.Module],
    policy: str,
    static_argnums: tuple[int, ...],
    *,
    scanned: bool = False,
) -> type[nn.Module]:
    """`module_class` wrapped in `nn.remat` with the named policy ("none": unchanged).

    `static_argnums` count `self` as 0. Under `nn.scan` the loop already keeps XLA from
    merging the recomputation into the forward pass, so `prevent_cse` is off there.
    """
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy must be one of {tuple(REMAT_POLICIES)}, got {policy!r}")
    if policy == "none":
        return module_class
    return nn.remat(
        module_class,
        policy=REMAT_POLICIES[policy],
        static_argnums=static_argnums,
        prevent_cse=not scanned,
    )
