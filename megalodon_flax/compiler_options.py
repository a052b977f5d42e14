"""XLA compiler options for the project's compiled steps, chosen per platform.

On CPU the train and eval steps compile with LLVM's optimisation level 1 instead of the
default 2: in benchmarks/RESULTS.md ("Start-up") this cuts the enwik8 train step's
compile time by about a fifth while its step time and the 32K forward's run time stay
within noise, because the step's time goes to large vectorised fusions and matmul
library calls that the cheaper LLVM pipeline still emits well. Other platforms keep XLA's
defaults until a measurement there says otherwise.
"""

from __future__ import annotations

from typing import Any

import jax

CPU_OPTIONS: dict[str, Any] = {"xla_backend_optimization_level": 1}


def compiler_options(platform: str | None = None) -> dict[str, Any] | None:
    """The `compiler_options` to pass to `jax.jit` for computations on `platform`.

    Args:
        platform: A JAX platform name ("cpu", "gpu", "cuda", "tpu"); None means the default
            backend.

    Returns:
        A fresh dict of XLA options, or None where XLA's defaults are kept.
    """
    if platform is None:
        platform = jax.default_backend()
    if platform == "cpu":
        return dict(CPU_OPTIONS)
    return None


def mesh_platform(mesh: jax.sharding.Mesh) -> str:
    """The platform of a mesh's devices (all devices of a mesh share one)."""
    return mesh.devices.flat[0].platform
