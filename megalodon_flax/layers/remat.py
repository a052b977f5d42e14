"""Rematerialization policies for the blocks of both model families.

A policy names what the backward pass may keep from the forward pass of a block; the rest
is recomputed. "none" keeps everything (no remat), "full" keeps only the block's inputs,
"save_dots" keeps every matmul output and "save_dots_no_batch" keeps the matmul outputs
without batch dimensions (the projections, not the attention score products).
"save_dots_spectra_probs" keeps what "save_dots_no_batch" keeps plus the values the code tags
with `checkpoint_name` as the costliest to recompute: CEMA's FFT spectra of its input and
kernel and the attention probabilities (benchmarks/RESULTS.md, "Execution options").
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

# `jax.ad_checkpoint.checkpoint_name` tags (on real arrays: a complex value is tagged by parts).
CEMA_SPECTRUM = "cema_spectrum"
CEMA_KERNEL_SPECTRUM = "cema_kernel_spectrum"
ATTENTION_PROBS = "attention_probs"

REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_dots_spectra_probs": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(
            CEMA_SPECTRUM, CEMA_KERNEL_SPECTRUM, ATTENTION_PROBS
        ),
    ),
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
