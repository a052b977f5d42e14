"""XLA compiler options for the project's compiled steps, chosen per platform.

On CPU the train and eval steps (and the state's initialiser) compile with LLVM's
optimisation level 1 instead of the default 2. benchmarks/RESULTS.md ("Start-up",
2026-12-01) measured 9-14 % less compile time for the 512-token forward, a difference
within noise for the enwik8 train step, and no measurable change in run time; the values
match XLA's defaults to float32 rounding (tests/training/setup_test.py). Other platforms
keep XLA's defaults until a measurement there says otherwise. An optimisation level the user
sets in `XLA_FLAGS` (`--xla_backend_optimization_level=N`) wins: the steps then keep it.
"""

from __future__ import annotations

import os
from typing import Any

import jax

CPU_OPTIONS: dict[str, Any] = {"xla_backend_optimization_level": 1}


def compiler_options(platform: str | None = None) -> dict[str, Any] | None:
    """The `compiler_options` to pass to `jax.jit` for computations on `platform`.

    Args:
        platform: A JAX platform name ("cpu", "gpu", "cuda", "tpu"); None means the default
            backend.

    Returns:
        A fresh dict of XLA options, or None where XLA's defaults (or the user's
        `XLA_FLAGS`) are kept.
    """
    if platform is None:
        platform = jax.default_backend()
    if platform == "cpu" and "xla_backend_optimization_level" not in os.environ.get(
        "XLA_FLAGS", ""
    ):
        return dict(CPU_OPTIONS)
    return None


def mesh_platform(mesh: jax.sharding.Mesh) -> str:
    """The platform of a mesh's devices (all devices of a mesh share one)."""
    return mesh.devices.flat[0].platform
