"""Checkpoints carry checksums checked on restore; damage, truncation, incomplete folders and
a full disk end in one clear message (issue 13, root cause 3 and the noisy cases).

Oracles: bytes flipped or cut by the test itself, the arrays a raw orbax read (no checks)
returns next to the arrays that were saved, SHA-256 computed here from the saved values.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.path import async_path

from megalodon_flax.training import checkpoint_files, checkpointing, integrity
from megalodon_flax.training.errors import CheckpointError
from megalodon_flax.training.setup import TrainingSetup, setup_training
from tests import factories
from tests.robustness import safety_helpers as sh


@pytest.fixture(scope="module")
def setup() -> TrainingSetup:
    return setup_training(factories.tiny_train_config())


# orbax abandons TensorStore reads and writes after a failure; their callbacks then find
# orbax's event loop closed (the CLIs drop these, see `training/orbax_noise.py`).
quiet_teardown = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _random_state(setup: TrainingSetup, seed: int):
    rng = np.random.default_rng(seed)

    def fill(x):
        if np.issubdtype(x.dtype, np.integer):
            return jax.device_put(rng.integers(0, 1000, x.shape).astype(x.dtype), x.sharding)
        return jax.device_put(rng.normal(size=x.shape).astype(x.dtype), x.sharding)

    return jax.tree.map(fill, setup.abstract_state)


def _save(workdir: Path, setup: TrainingSetup, state, step: int, async_save: bool = True):
    manager = checkpointing.create_manager(workdir, max_to_keep=3, async_save=async_save)
    checkpointing.save(
        manager, step, state, {"step": step}, checkpointing.run_metadata(setup.config)
    )
    checkpointing.finish(manager)


def _restore(workdir: Path, setup: TrainingSetup):
    manager = checkpointing.create_manager(workdir, max_to_keep=3)
    try:
        return checkpointing.restore_latest(
            manager, setup.abstract_state, checkpointing.run_metadata(setup.config)
        )
    finally:
        manager.close()


def _raw_restore(workdir: Path, setup: TrainingSetup, step: int):
    """What orbax reads back without any of our checks (None if it cannot read it)."""
    manager = ocp.CheckpointManager(workdir.resolve() / "checkpoints")
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(setup.abstract_state))
        )
        return restored["state"]
    except Exception:
        return None
    finally:
        manager.close()


def _assert_equal_states(got, want) -> None:
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), jax.tree_util.keystr(path))


def _one_clear_line(message: str, directory: Path) -> None:
    assert str(directory) in message, message
    # The length bound is for what the message says, not for where the test's tmp_path is.
    said = message.replace(str(directory.parent.parent), "<workdir>")
    assert "\n" not in message and len(said) < 600, message
    assert "tensorstore_spec" not in message and "'driver'" not in message, message


def test_checksums_cover_every_array_with_the_saved_bytes(tmp_path: Path, setup) -> None:
    state = _random_state(setup, 0)
    _save(tmp_path, setup, state, 4)
    record = json.loads((tmp_path / "checkpoints/4/integrity/metadata").read_text())
    leaves = integrity.named_leaves(state)
    assert set(record["arrays"]) == {name for name, _ in leaves} and len(leaves) > 50
    for name, leaf in leaves:
        value = np.asarray(leaf)
        entry = record["arrays"][name]
        assert entry["sha256"] == hashlib.sha256(value.tobytes()).hexdigest(), name
        assert entry["shape"] == list(value.shape) and entry["dtype"] == str(value.dtype)


@quiet_teardown
def test_flipped_bytes_name_the_damaged_arrays(tmp_path: Path, setup) -> None:
    """64 bytes flipped inside each array data file in turn: the restore either names exactly
    the arrays whose values changed (oracle: a raw read compared with the saved state) or,
    when TensorStore's own checks let it read every array intact, returns the saved state."""
    state = _random_state(setup, 1)
    pristine = tmp_path / "pristine"
    _save(pristine, setup, state, 4)
    named = 0
    for k, _ in enumerate(sh.data_files(pristine / "checkpoints" / "4")):
        workdir = tmp_path / f"w{k}"
        shutil.copytree(pristine, workdir)
        target = sh.data_files(workdir / "checkpoints" / "4")[k]
        sh.flip_bytes(target, target.stat().st_size // 2)
        raw = _raw_restore(workdir, setup, 4)
        changed = None
        if raw is not None:
            changed = [
                name
                for (name, got), want in zip(
                    integrity.named_leaves(raw), jax.tree.leaves(state), strict=True
                )
                if not np.array_equal(np.asarray(got), np.asarray(want), equal_nan=True)
            ]
        if changed == []:
            _, restored, _ = _restore(workdir, setup)  # intact values: restores as saved
            _assert_equal_states(restored, state)
            continue
        with pytest.raises(CheckpointError) as info:
            _restore(workdir, setup)
        message = str(info.value)
        _one_clear_line(message, workdir.resolve() / "checkpoints" / "4")
        assert "damaged" in message
        for name in changed or []:
            assert name in message, (name, message)
        named += bool(changed)
    assert named >= 1  # at least one flip reached array values and was named


@quiet_teardown
def test_damaged_and_truncated_checkpoints_suggest_the_previous_one(tmp_path: Path, setup) -> None:
    old, new = _random_state(setup, 2), _random_state(setup, 3)
    _save(tmp_path, setup, old, 2)
    _save(tmp_path, setup, new, 4)
    biggest = sh.data_files(tmp_path / "checkpoints" / "4")[0]
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 3])  # truncated
    with pytest.raises(CheckpointError) as info:
        _restore(tmp_path, setup)
    message = str(info.value)
    _one_clear_line(message, tmp_path.resolve() / "checkpoints" / "4")
    assert "resume from the previous checkpoint (step 2)" in message
    assert "delete" not in message.lower()
    # Following the advice: the previous checkpoint restores bitwise.
    shutil.move(tmp_path / "checkpoints" / "4", tmp_path / "aside")
    step, restored, _ = _restore(tmp_path, setup)
    assert step == 2
    _assert_equal_states(restored, old)


def test_checkpoint_without_checksums_restores(tmp_path: Path, setup) -> None:
    """Checkpoints written before the checksums existed have no `integrity` item."""
    state = _random_state(setup, 4)
    _save(tmp_path, setup, state, 3)
    shutil.rmtree(tmp_path / "checkpoints" / "3" / "integrity")
    step, restored, _ = _restore(tmp_path, setup)
    assert step == 3
    _assert_equal_states(restored, state)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_nonfinite_values_in_a_checkpoint_are_refused(tmp_path: Path, setup, bad_value) -> None:
    state = jax.tree.map(np.array, jax.device_get(_random_state(setup, 5)))
    mu = state.opt_state[1][0].mu["model"]["embed"]["embedding"]
    mu[2, 3] = bad_value
    manager = ocp.CheckpointManager(
        tmp_path.resolve() / "checkpoints",
        item_handlers={"state": ocp.StandardCheckpointHandler()},
    )
    manager.save(6, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    manager.wait_until_finished()
    manager.close()
    (tmp_path / "checkpoints" / "6" / "data").mkdir()  # an item the restore needs
    (tmp_path / "checkpoints" / "6" / "data" / "metadata").write_text('{"step": 6}')
    with pytest.raises(CheckpointError) as info:
        _restore(tmp_path, setup)
    message = str(info.value)
    assert "non-finite" in message and "opt_state/1/0/mu/model/embed/embedding" in message
    assert "params/" not in message  # only the array holding the value is named


def test_incomplete_step_folders_are_skipped(tmp_path: Path, setup) -> None:
    state2, state4 = _random_state(setup, 6), _random_state(setup, 7)
    _save(tmp_path, setup, state2, 2)
    _save(tmp_path, setup, state4, 4)
    (tmp_path / "checkpoints" / "4" / "commit_success.txt").unlink()
    (tmp_path / "checkpoints" / "9").mkdir()  # a bare folder named like a step
    assert checkpoint_files.complete_steps(tmp_path / "checkpoints") == [2]
    step, restored, _ = _restore(tmp_path, setup)
    assert step == 2
    _assert_equal_states(restored, state2)


async def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@quiet_teardown
@pytest.mark.parametrize("async_save", [True, False])
def test_disk_full_save_fails_cleanly(tmp_path: Path, setup, monkeypatch, async_save) -> None:
    """orbax's file writer (metadata, commit marker) raising ENOSPC: one line, no temp folder,
    the previous checkpoint intact."""
    good = _random_state(setup, 8)
    _save(tmp_path, setup, good, 2)
    monkeypatch.setattr(async_path, "write_text", _enospc)
    manager = checkpointing.create_manager(tmp_path, max_to_keep=3, async_save=async_save)
    with pytest.raises(CheckpointError) as info:
        state = _random_state(setup, 9)
        checkpointing.save(manager, 4, state, {"step": 4}, checkpointing.run_metadata(setup.config))
        checkpointing.finish(manager)
    with contextlib.suppress(Exception):
        manager.close()
    message = str(info.value)
    _one_clear_line(message, tmp_path.resolve() / "checkpoints")
    assert "No space left on device" in message
    newest = tmp_path.resolve() / "checkpoints" / "2"
    assert f"the newest complete checkpoint is {newest}" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
    monkeypatch.undo()
    step, restored, _ = _restore(tmp_path, setup)
    assert step == 2
    _assert_equal_states(restored, good)


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 256 KiB tmpfs (needs mount rights: skipped without them)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@quiet_teardown
def test_full_tmpfs_fails_cleanly(small_tmpfs: Path, setup, monkeypatch) -> None:
    state = _random_state(setup, 10)
    assert (
        checkpoint_files.state_nbytes(state)
        < 256 << 10
        < checkpoint_files.state_nbytes(state) + checkpoint_files.SPACE_MARGIN_BYTES
    )
    workdir = small_tmpfs / "run"
    manager = checkpointing.create_manager(workdir, max_to_keep=3)
    with pytest.raises(CheckpointError, match="not enough free space") as info:
        checkpointing.save(manager, 2, state, {"step": 2}, {"model": {}})
    _one_clear_line(str(info.value), workdir.resolve() / "checkpoints")
    assert list((workdir / "checkpoints").iterdir()) == []  # refused before writing
    # Without the free-space check the write itself fails: still one line, no temp folder.
    monkeypatch.setattr(checkpoint_files, "SPACE_MARGIN_BYTES", -(1 << 40))
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * (200 << 10))
    with pytest.raises(CheckpointError) as info:
        checkpointing.save(manager, 2, state, {"step": 2}, {"model": {}})
        checkpointing.finish(manager)
    with contextlib.suppress(Exception):
        manager.close()
    message = str(info.value)
    _one_clear_line(message, workdir.resolve() / "checkpoints")
    assert "No space left on device" in message
    assert list((workdir / "checkpoints").iterdir()) == []
