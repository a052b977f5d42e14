"""Non-finite training never goes unnoticed (issue 13, root cause 1).

Oracles: an independent training loop (plain mean cross-entropy, `jax.grad`, the optimizer
applied by hand) that finds the first step whose loss, gradient norm or updated state is not
finite; the state before a poisoned step; a clean run's losses.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np
import pytest

from megalodon_flax.data import pipeline
from megalodon_flax.training import checkpointing, loop
from megalodon_flax.training.errors import NonFiniteTrainingError
from megalodon_flax.training.setup import setup_training
from tests import helpers
from tests.robustness import safety_helpers as sh

pytestmark = pytest.mark.usefixtures("highest_precision")

# Learning rate 1e5 without clipping: the tiny model's gradients overflow at step 3.
EXPLODING = {"optimizer": {"learning_rate": 1e5, "grad_clip_norm": 0.0}}


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> tuple[str, str]:
    return helpers.make_enwik8_dirs(tmp_path_factory.mktemp("enwik8"))


def _first_bad_step(records) -> int:
    return next(
        i + 1
        for i, (loss, norm, ok) in enumerate(records)
        if not (math.isfinite(loss) and math.isfinite(norm) and ok)
    )


def _poisoned_batch(config, data: np.ndarray, index: int) -> dict[str, np.ndarray]:
    batch = pipeline.train_batch(
        data, index, seq_len=config.seq_len, global_batch_size=config.batch_size, seed=config.seed
    )
    batch["weights"] = batch["weights"].copy()
    batch["weights"][0, 0] = np.nan  # total weight NaN: loss and gradients NaN
    return batch


def test_train_step_flags_and_skips_a_nonfinite_update(data_dirs) -> None:
    config = sh.tiny_run_config(data_dirs, nan_policy="skip")
    setup = setup_training(config)
    data = sh.train_split(config)
    state = setup.init_state()
    clean = pipeline.train_batch(
        data, 0, seq_len=config.seq_len, global_batch_size=config.batch_size, seed=config.seed
    )
    state, _ = setup.train_step(state, clean)
    before = jax.device_get(state)
    state, metrics = setup.train_step(state, _poisoned_batch(config, data, 1))
    after = jax.device_get(state)
    result = jax.device_get(metrics.compute())
    assert result["nonfinite_loss"] == 1 and result["nonfinite_grad_norm"] == 1
    assert result["skipped_updates"] == 1
    assert int(after.step) == int(before.step) + 1
    for (path, old), new in zip(
        jax.tree_util.tree_leaves_with_path(before.params),
        jax.tree.leaves(after.params),
        strict=True,
    ):
        np.testing.assert_array_equal(new, old, err_msg=jax.tree_util.keystr(path))
    floats = [
        (old, new)
        for old, new in zip(
            jax.tree.leaves(before.opt_state), jax.tree.leaves(after.opt_state), strict=True
        )
        if np.issubdtype(np.asarray(old).dtype, np.inexact)
    ]
    assert floats and all(np.array_equal(old, new) for old, new in floats)
    # The same step with the default policy reports the same flags and applies the update.
    stop = setup_training(sh.tiny_run_config(data_dirs))
    state = stop.init_state()
    state, _ = stop.train_step(state, clean)
    state, metrics = stop.train_step(state, _poisoned_batch(config, data, 1))
    result = jax.device_get(metrics.compute())
    assert result["nonfinite_loss"] == 1 and result["skipped_updates"] == 0
    assert not np.isfinite(np.asarray(state.params["model"]["embed"]["embedding"])).all()


def test_stop_names_the_first_nonfinite_step_and_saves_nothing_after(
    tmp_path: Path, data_dirs
) -> None:
    # Flags are fetched only before a log line, evaluation, sample or checkpoint (here every
    # 2 steps), yet the message names the exact step.
    config = sh.tiny_run_config(
        data_dirs,
        num_train_steps=12,
        log_every_steps=5,
        checkpoint={"every_steps": 2},
        **EXPLODING,
    )
    setup = setup_training(config)
    records, _ = sh.oracle_training(setup, sh.train_split(config), config.num_train_steps)
    bad = _first_bad_step(records)
    assert 2 < bad <= 12, records
    workdir = tmp_path / "run"
    with pytest.raises(NonFiniteTrainingError) as info:
        loop.train_and_evaluate(config, workdir)
    message = str(info.value)
    assert f"training stopped at step {bad}:" in message
    loss, norm, update_ok = records[bad - 1]
    assert ("the loss" in message) == (not math.isfinite(loss))
    assert ("gradient norm" in message) == (not math.isfinite(norm))
    assert ("updated parameters" in message) == (not update_ok)
    good = 2 * ((bad - 1) // 2)
    assert f"last good checkpoint is {workdir.resolve() / 'checkpoints' / str(good)}" in message
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
    assert saved == list(range(2, bad, 2))
    # Nothing of the window holding the bad step was logged (a log line comes every 5 steps).
    assert helpers.read_scalars(workdir, "train_loss") == {}
    run = checkpointing.restore_run(workdir)  # finite, checksums verified
    assert run.step == good


@pytest.mark.slow
def test_skip_policy_skips_exactly_the_poisoned_step(tmp_path: Path, data_dirs, monkeypatch):
    poisoned = 3
    config = sh.tiny_run_config(
        data_dirs,
        num_train_steps=6,
        log_every_steps=2,
        nan_policy="skip",
        checkpoint={"every_steps": 3},
    )
    clean_dir, skip_dir = tmp_path / "clean", tmp_path / "skip"
    loop.train_and_evaluate(
        sh.tiny_run_config(data_dirs, num_train_steps=6, log_every_steps=2), clean_dir
    )
    original = pipeline.TrainIterator.__next__

    def poisoning_next(self):
        index = self.get_state()["step"]
        batch = original(self)
        if index == poisoned - 1:
            batch["weights"] = np.full_like(batch["weights"], np.nan)
        return batch

    monkeypatch.setattr(pipeline.TrainIterator, "__next__", poisoning_next)
    state = loop.train_and_evaluate(config, skip_dir)
    assert int(state.step) == 6
    skipped = helpers.read_scalars(skip_dir, "skipped_updates")
    assert skipped == {2: 0, 4: 1, 6: 0}
    clean_loss = helpers.read_scalars(clean_dir, "train_loss")
    skip_loss = helpers.read_scalars(skip_dir, "train_loss")
    assert skip_loss[2] == clean_loss[2]  # bitwise: the guard does not change applied steps
    assert all(math.isfinite(v) for v in skip_loss.values())
    setup = setup_training(config)
    _, want = sh.oracle_training(setup, sh.train_split(config), 6, skip={poisoned})
    _, unskipped = sh.oracle_training(setup, sh.train_split(config), 6)
    got = checkpointing.restore_run(skip_dir).params
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))
    differs = [
        not np.allclose(b, c, rtol=1e-3, atol=1e-5)
        for b, c in zip(jax.tree.leaves(want), jax.tree.leaves(unskipped), strict=True)
    ]
    assert any(differs)  # skipping step 3 mattered: the oracle can tell


def test_a_nonfinite_state_is_never_saved(tmp_path: Path, data_dirs) -> None:
    setup = setup_training(sh.tiny_run_config(data_dirs))
    state = setup.init_state()
    kernel = np.asarray(state.params["model"]["embed"]["embedding"]).copy()
    kernel[3, 1] = np.inf
    params = jax.tree.map(lambda x: x, state.params)
    params["model"]["embed"]["embedding"] = jax.device_put(
        kernel, state.params["model"]["embed"]["embedding"].sharding
    )
    state = state.replace(params=params)
    manager = checkpointing.create_manager(tmp_path, max_to_keep=2)
    with pytest.raises(NonFiniteTrainingError, match="params/model/embed/embedding"):
        checkpointing.save(manager, 5, state, {"step": 5}, checkpointing.run_metadata(setup.config))
    checkpointing.finish(manager)
    assert not any((tmp_path / "checkpoints").iterdir())


@pytest.mark.slow
def test_cli_stops_with_one_error_line(tmp_path: Path, data_dirs) -> None:
    data_dir, manual_dir = data_dirs
    workdir = tmp_path / "run"
    proc = sh.run_main(
        workdir,
        f"--config.data.data_dir={data_dir}",
        f"--config.data.manual_dir={manual_dir}",
        "--config.optimizer.learning_rate=1e6",
        "--config.optimizer.grad_clip_norm=0",
        "--config.num_train_steps=20",
        "--config.checkpoint.every_steps=2",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = sh.error_lines(proc)
    assert len(errors) == 1 and "training stopped at step" in errors[0], proc.stderr[-3000:]
    bad = int(errors[0].split("training stopped at step ")[1].split(":")[0])
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
    assert saved == list(range(2, bad, 2))
