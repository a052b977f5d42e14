"""A workdir written before the restructuring still restores, samples and converts.

Oracle: `tests/testdata/legacy_run_logits.npz`, the logits the old code computed from the
checkpoint in `tests/testdata/legacy_run/` (see `tests/testdata/README.md`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax.megalodon.convert import load_state_dict
from megalodon_flax.training import checkpointing
from tests import helpers

DATA = helpers.TESTDATA


@pytest.fixture
def legacy_workdir(tmp_path: Path) -> Path:
    workdir = tmp_path / "legacy_run"
    shutil.copytree(DATA / "legacy_run", workdir)
    return workdir


def test_legacy_run_restores_with_the_same_logits(legacy_workdir: Path) -> None:
    expected = np.load(DATA / "legacy_run_logits.npz")
    run = checkpointing.restore_run(legacy_workdir)
    assert run.step == int(expected["step"]) == 2
    assert run.config.optimizer.learning_rate == 3e-3  # the flat `learning_rate` key
    assert run.config.checkpoint.async_save is False  # the flat `async_checkpointing`
    logits, _ = run.model.apply({"params": run.params}, jnp.asarray(expected["tokens"]))
    # The logits were saved by the code of that time; later changes to how the same function
    # is computed (TimestepNorm's blocked prefix sums) move them by float32 rounding only.
    np.testing.assert_allclose(np.asarray(logits), expected["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_legacy_run_samples_and_converts(legacy_workdir: Path, tmp_path: Path) -> None:
    def cli(module: str, *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", f"megalodon_flax.cli.{module}", *args],
            cwd=helpers.REPO_ROOT,
            env=helpers.subprocess_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    sample = cli("sample", f"--workdir={legacy_workdir}", "--prompt=<page>", "--max_new_tokens=8")
    assert sample.stdout.startswith("<page>")
    out = tmp_path / "hf"
    cli("convert", f"--workdir={legacy_workdir}", "--to=hf", f"--out={out}")
    state_dict = load_state_dict(str(out))
    run = checkpointing.restore_run(legacy_workdir)
    embedding = np.asarray(run.params["model"]["embed"]["embedding"])
    np.testing.assert_array_equal(state_dict["model.embed.weight"], embedding)
