"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import pytest

from tests import helpers


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
