"""Tests of orbax checkpointing (megalodon_flax.training.checkpointing): round trip, mismatch
and damage errors, the saved config, asynchronous saves.

Oracles: random train states written and read back bitwise (values, dtypes, shardings), the
run that saves synchronously for the asynchronous one, and the expected error messages.
(SIGKILL and resume: `tests/integration/resume_test.py`.)
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from megalodon_flax.training import checkpointing, loop
from megalodon_flax.training.setup import TrainingSetup, setup_training
from megalodon_flax.training.steps import TrainState
from tests import helpers
from tests.factories import tiny_train_config


def _random_state(setup: TrainingSetup, seed: int) -> TrainState:
    """A train state with random values in every leaf, laid out like the real one."""
    rng = np.random.default_rng(seed)

    def fill(x: jax.ShapeDtypeStruct) -> jax.Array:
        if np.issubdtype(x.dtype, np.integer):
            value = rng.integers(0, 1000, x.shape).astype(x.dtype)
        else:
            value = rng.normal(size=x.shape).astype(x.dtype)
        return jax.device_put(value, x.sharding)

    return jax.tree.map(fill, setup.abstract_state)


def _save(workdir: Path, setup: TrainingSetup, state, step: int) -> None:
    manager = checkpointing.create_manager(workdir, max_to_keep=2)
    checkpointing.save(
        manager,
        step,
        state,
        {"step": step, "train_iterator": {"step": step}},
        checkpointing.run_metadata(setup.config),
    )
    manager.wait_until_finished()
    manager.close()


def test_round_trip_is_bitwise_with_shardings_and_data_position(tmp_path: Path) -> None:
    setup = setup_training(tiny_train_config())
    assert helpers.restore_checkpoint(tmp_path, setup) is None  # nothing saved yet
    state = _random_state(setup, 0)
    _save(tmp_path, setup, state, 3)
    later = _random_state(setup, 1)
    _save(tmp_path, setup, later, 7)
    step, restored, data = helpers.restore_checkpoint(tmp_path, setup)
    assert step == 7
    assert data == {"step": 7, "train_iterator": {"step": 7}}
    assert isinstance(restored, TrainState)
    flat_want = jax.tree_util.tree_leaves_with_path(later)
    flat_got = jax.tree.leaves(restored)
    assert len(flat_want) == len(flat_got) > 50
    for (path, want), got in zip(flat_want, flat_got, strict=True):
        assert got.dtype == want.dtype, jax.tree_util.keystr(path)
        assert got.sharding == want.sharding, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("saved_scanned", [False, True])
def test_checkpoint_restores_into_the_other_layer_layout(
    tmp_path: Path, saved_scanned: bool
) -> None:
    """A state saved with unrolled (scanned) layers restores into a scanned (unrolled) run:
    every array of the parameters and of AdamW's moments is the saved one, stacked (or
    sliced) by layer, on the run's shardings."""
    saved_setup = setup_training(
        tiny_train_config(model={"num_layers": 2, "scan_layers": saved_scanned})
    )
    saved = _random_state(saved_setup, 0)
    _save(tmp_path, saved_setup, saved, 4)
    setup = setup_training(
        tiny_train_config(model={"num_layers": 2, "scan_layers": not saved_scanned})
    )
    step, restored, _ = helpers.restore_checkpoint(tmp_path, setup)
    assert step == 4
    assert jax.tree.structure(restored) == jax.tree.structure(setup.abstract_state)

    def by_layer(tree, scanned):  # {(i or None, path): array}: the oracle indexes by hand
        out = {}
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
            names = [str(k) for k in keys]
            if scanned and "layers" in names:
                at = names.index("layers")
                for i in range(leaf.shape[0]):
                    key = (*names[:at], f"layers_{i}", *names[at + 1 :])
                    out[key] = np.asarray(leaf)[i]
            else:
                out[tuple(names)] = np.asarray(leaf)
        return out

    want, got = by_layer(saved, saved_scanned), by_layer(restored, not saved_scanned)
    assert set(want) == set(got) and any("layers_1" in key for key in want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg="/".join(key))
    for got_leaf, abstract in zip(
        jax.tree.leaves(restored), jax.tree.leaves(setup.abstract_state), strict=True
    ):
        assert got_leaf.sharding == abstract.sharding


@pytest.mark.parametrize(
    ("scanned", "change", "expect"),
    [
        (True, {"model_dim": 32}, r"params/model/embed/embedding: checkpoint shape \(256, 16\)"),
        (True, {"num_layers": 2}, r"params/model/layers/attn/beta: checkpoint shape \(1, 2, 8\)"),
        (True, {"swiglu": False}, r"not in the current model: params/model/layers/ffn/fc3"),
        (False, {"num_layers": 2}, r"missing in the checkpoint: params/model/layers_1"),
        (False, {"swiglu": False}, r"not in the current model: params/model/layers_0/ffn/fc3"),
    ],
)
def test_mismatched_model_stops_with_clear_error(
    tmp_path: Path, scanned: bool, change, expect
) -> None:
    setup = setup_training(tiny_train_config(model={"scan_layers": scanned}))
    _save(tmp_path, setup, _random_state(setup, 0), 4)
    other = setup_training(tiny_train_config(model={"scan_layers": scanned, **change}))
    with pytest.raises(checkpointing.CheckpointError) as info:
        helpers.restore_checkpoint(tmp_path, other)
    message = str(info.value)
    assert str(tmp_path / "checkpoints" / "4") in message
    assert "does not match the current model" in message
    assert re.search(expect, message), message
    key = next(iter(change))
    assert f"{key}:" in message  # the config difference is spelled out


# orbax's background event loop may report on shutdown after a failed read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["garbage_data", "missing_metadata", "empty_state_dir"])
def test_damaged_checkpoint_stops_with_clear_error(tmp_path: Path, damage: str) -> None:
    setup = setup_training(tiny_train_config())
    _save(tmp_path, setup, _random_state(setup, 0), 5)
    state_dir = tmp_path / "checkpoints" / "5" / "state"
    files = [p for p in state_dir.rglob("*") if p.is_file()]
    if damage == "garbage_data":
        for p in files:
            if "ocdbt" in str(p.relative_to(state_dir)) or p.parent.name == "d":
                p.write_bytes(b"\x00garbage" * 7)
    elif damage == "missing_metadata":
        (state_dir / "_METADATA").unlink()
    else:
        for p in files:
            p.unlink()
    with pytest.raises(checkpointing.CheckpointError) as info:
        helpers.restore_checkpoint(tmp_path, setup)
    assert str(tmp_path / "checkpoints" / "5") in str(info.value)


def test_train_and_evaluate_refuses_checkpoint_of_other_model(tmp_path: Path, enwik8_data) -> None:
    config = tiny_train_config(data=enwik8_data)
    setup = setup_training(config)
    workdir = tmp_path / "run"
    _save(workdir, setup, _random_state(setup, 0), 4)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, num_layers=2))
    with pytest.raises(checkpointing.CheckpointError, match="num_layers: 1 -> 2") as info:
        loop.train_and_evaluate(config, str(workdir))
    assert str(workdir / "checkpoints" / "4") in str(info.value)
    assert not helpers.read_scalars(workdir, "train_loss")  # stopped before training


def test_config_is_saved_as_json(tmp_path: Path) -> None:
    config = tiny_train_config(seed=11)
    path = checkpointing.save_config(config, tmp_path)
    saved = json.loads(Path(path).read_text())
    assert saved["seed"] == 11
    assert saved["model"]["model_dim"] == 16
    assert saved["mesh"]["shape"] == list(config.mesh.shape)
    assert set(saved) == {f.name for f in dataclasses.fields(config)}
    assert checkpointing.load_run_config(tmp_path) == config  # reads back as the same config


@pytest.mark.slow
def test_async_checkpoints_hold_the_state_of_their_step(tmp_path: Path, enwik8_data) -> None:
    """Training goes on (donating buffers) while a checkpoint is written in the background;
    the checkpoints must equal those of a run that saves synchronously."""

    def config(async_save: bool):
        return tiny_train_config(
            data=enwik8_data,
            num_train_steps=6,
            checkpoint={"every_steps": 2, "async_save": async_save},
            eval={"every_steps": 100},
            sampling={"every_steps": 0},
            log_every_steps=3,
        )

    loop.train_and_evaluate(config(True), tmp_path / "a")
    loop.train_and_evaluate(config(False), tmp_path / "s")
    setup = setup_training(tiny_train_config())
    for step in (2, 4, 6):
        states = []
        for run in ("a", "s"):
            manager = checkpointing.create_manager(tmp_path / run, max_to_keep=3)
            assert manager.all_steps() == [2, 4, 6]
            restored = manager.restore(
                step,
                args=checkpointing.ocp.args.Composite(
                    state=checkpointing.ocp.args.StandardRestore(setup.abstract_state)
                ),
            )
            manager.close()
            states.append(restored["state"])
        assert int(states[0].step) == step
        for x, y in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
    """Workdirs are usually relative (`--workdir=runs/x`); orbax needs absolute paths."""
    import jax.numpy as jnp

    monkeypatch.chdir(tmp_path)
    state = {"w": jnp.arange(6.0).reshape(2, 3)}
    manager = checkpointing.create_manager("runs/rel", max_to_keep=1, async_save=False)
    checkpointing.save(manager, 3, state, {"step": 3}, {"model": {}})
    manager.wait_until_finished()
    target = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}
    step, restored, data = checkpointing.restore_latest(manager, target, {"model": {}})
    manager.close()
    assert step == 3 and data == {"step": 3}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
    assert (tmp_path / "runs" / "rel" / "checkpoints" / "3").is_dir()
