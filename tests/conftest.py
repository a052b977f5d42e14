"""Fixtures and set-up shared by the whole suite."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import jax
import pytest

from tests import helpers

# The suite compiles the same programs many times (every `setup_training` of a tiny config
# jits afresh, and child processes repeat the parent's programs), so all its processes share
# one persistent XLA cache: the test workers and, through the environment, their children.
# A fresh directory per run unless JAX_COMPILATION_CACHE_DIR is set already (to keep one
# across runs); the cache key covers the program, the options and the devices.
_CACHE_SETTINGS = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
_OWNED_CACHE_ENV = "MEGALODON_FLAX_TEST_OWNS_JAX_CACHE"
# LLVM's optimisation level 0: a third less compile time for the suite's small programs,
# which run for milliseconds (the project's CPU options yield to it: compiler_options.py).
_XLA_TEST_FLAGS = "--xla_backend_optimization_level=0"


def pytest_configure(config: pytest.Config) -> None:
    """Points this process and its children at the suite's compilation cache and XLA flags.
    Runs before anything compiles, in the controller first (before it starts any xdist
    worker, which inherits its environment)."""
    if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_XLA_TEST_FLAGS}".strip()
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="megalodon_jax_cache_")
        os.environ[_OWNED_CACHE_ENV] = "1"
    os.environ.update(_CACHE_SETTINGS)
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config: pytest.Config) -> None:
    """The controller removes the cache directory it made (workers leave it)."""
    if os.environ.get(_OWNED_CACHE_ENV) and "PYTEST_XDIST_WORKER" not in os.environ:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="module")
def highest_precision() -> Iterator[None]:
    """float32 matmuls at precision HIGHEST for a whole test module.

    Apply with `pytestmark = pytest.mark.usefixtures("highest_precision")`. Module scope, so
    that the module's own module-scoped fixtures and lazily cached programs are built under the
    same setting as its tests; the global JAX config is left alone for the other modules.
    """
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture
def enwik8_data(tmp_path) -> dict[str, str]:
    """The `data` section of a training config reading a short real-text enwik8 (a prefix of
    the bundled sample) written under `tmp_path`: `{"data_dir": ..., "manual_dir": ...}`."""
    data_dir, manual_dir = helpers.make_enwik8_dirs(tmp_path / "data")
    return {"data_dir": data_dir, "manual_dir": manual_dir}
