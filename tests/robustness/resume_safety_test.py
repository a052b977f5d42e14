"""Nothing in a workdir is written before the run was checked against it; the resume rule;
the workdir lock; incomplete step folders (issue 13, root causes 2, 4 and 5).

Oracles: byte snapshots of the workdir taken before a refused run; logits of models that
differ in one field (does the field change what the model computes?); the pid of the
process holding the lock; an uninterrupted run's losses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from megalodon_flax import families
from megalodon_flax.megalodon import layer_stack
from megalodon_flax.training import checkpointing, loop, resume
from megalodon_flax.training.errors import ResumeMismatchError, WorkdirLockedError
from megalodon_flax.training.workdir_lock import WorkdirLock
from tests import factories, helpers
from tests.robustness import safety_helpers as sh


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> tuple[str, str]:
    return helpers.make_enwik8_dirs(tmp_path_factory.mktemp("enwik8"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dirs) -> tuple[Path, object]:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    config = sh.tiny_run_config(
        data_dirs, num_train_steps=4, log_every_steps=2, checkpoint={"every_steps": 2}
    )
    workdir = tmp_path_factory.mktemp("trained") / "run"
    loop.train_and_evaluate(config, workdir)
    return workdir, config


def _with_model(config, **changes):
    return dataclasses.replace(config, model=config.model.replace(**changes))


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"model_dim": 32}, "model_dim: 16 -> 32"),  # other shapes (the 64 -> 32)
        ({"chunk_size": 4}, "chunk_size: 8 -> 4"),  # same shapes, other attention
        ({"timestep_norm_variant": "hf"}, "timestep_norm_variant: 'upstream' -> 'hf'"),
        ({"norm_eps": 1e-2}, "norm_eps: 1e-05 -> 0.01"),
        ({"num_layers": 2, "rope_layout": "half_split"}, "rope_layout"),
    ],
)
def test_refused_resume_changes_nothing_in_the_workdir(trained, tmp_path, changes, named):
    source, config = trained
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    before = sh.snapshot(workdir)
    with pytest.raises(ResumeMismatchError) as info:
        loop.train_and_evaluate(_with_model(config, **changes), workdir)
    message = str(info.value)
    assert named in message, message
    assert str(workdir.resolve() / "checkpoints" / "4") in message
    assert "delete" not in message.lower() and "nothing in the workdir was changed" in message
    assert sh.snapshot(workdir) == before  # config.json included: the run is intact
    run = checkpointing.restore_run(workdir)  # the tools still read the run
    assert run.step == 4 and run.config == config


def test_changes_that_keep_the_model_are_logged_and_resume(trained, tmp_path, caplog):
    source, config = trained
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    scanned = config.model.scan_layers
    changed = dataclasses.replace(
        _with_model(
            config, remat_policy="full", scan_layers=not scanned, cema_path="scan", dropout=0.1
        ),
        num_train_steps=5,
        batch_size=4,
        seed=3,
        optimizer=dataclasses.replace(config.optimizer, learning_rate=5e-3),
    )
    with caplog.at_level(logging.WARNING):
        state = loop.train_and_evaluate(changed, workdir)
    assert int(state.step) == 5
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    for expected in (
        f"remat_policy: {config.model.remat_policy!r} -> 'full'",
        f"scan_layers: {scanned} -> {not scanned}",
        "cema_path: 'fft' -> 'scan'",
        "dropout: 0.0 -> 0.1",
        "batch_size: 8 -> 4",
        "seed: 7 -> 3",
        "num_train_steps: 4 -> 5",
        "optimizer.learning_rate: 0.01 -> 0.005",
    ):
        assert expected in warnings, (expected, warnings)
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["seed"] == 3 and saved["model"]["remat_policy"] == "full"
    assert saved["model"]["scan_layers"] is (not scanned)


def _logits(config, params, tokens):
    return np.asarray(families.build_model(config).apply({"params": params}, tokens)[0])


# An alternative value per model field the rule lets change on resume.
LOGGED_ALTERNATIVES = {
    "remat_policy": "full",
    "scan_layers": True,
    "attention_impl": "dot_product",
    "cema_path": "sequential",
    "sequential_cema_below": 1000,
    "cema_block_size": 3,
    "init_mode": "bert",
    "init_std": 0.5,
    "dropout": 0.3,
    "attention_dropout": 0.3,
    "hidden_dropout": 0.3,
    "embedding_dropout": False,
    "compute_dtype": "bfloat16",
}
# Fields the rule refuses although the parameter shapes stay the same.
SAME_SHAPE_REFUSED = {
    "chunk_size": 4,
    "timestep_norm_variant": "hf",
    "norm_eps": 0.5,
    "rope_layout": "half_split",
    "rope_base": 10.0,
    "scale_emb": True,
}


# Other values of the string fields the rule refuses.
STRING_ALTERNATIVES = {
    "bias_topology": "upstream",
    "tie_policy": "explicit",
    "timestep_norm_variant": "hf",
    "rope_layout": "half_split",
    "param_dtype": "bfloat16",
}


@pytest.mark.parametrize("family", ["megalodon", "llama"])
def test_the_rule_lets_through_only_fields_that_keep_the_function(family):
    """Oracle: the logits of the same parameters under each logged field's other value are
    those of the saved config (bf16 compute within its rounding); same-shape fields the rule
    refuses change them."""
    config = (
        factories.tiny_megalodon_config(chunk_size=8)
        if family == "megalodon"
        else factories.tiny_llama_config()
    )
    fields = {f.name for f in dataclasses.fields(config)}
    every_field = {
        f.name
        for cls in (type(factories.tiny_megalodon_config()), type(factories.tiny_llama_config()))
        for f in dataclasses.fields(cls)
    }
    assert every_field >= resume.LOGGED_MODEL_FIELDS
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, config.vocab_size)
    model = families.build_model(config)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params)
    want = _logits(config, params, tokens)
    current = factories.tiny_train_config()
    for name in sorted(fields & resume.LOGGED_MODEL_FIELDS):
        other = config.replace(**{name: LOGGED_ALTERNATIVES[name]})
        tol = 0.1 if name == "compute_dtype" else 1e-4
        other_params = layer_stack.to_layout(params, getattr(other, "scan_layers", False))
        np.testing.assert_allclose(
            _logits(other, other_params, tokens), want, rtol=tol, atol=tol, err_msg=name
        )
    for name, value in SAME_SHAPE_REFUSED.items():
        if name not in fields:
            continue
        other = config.replace(**{name: value})
        assert not np.allclose(_logits(other, params, tokens), want, atol=1e-3), name
    # And the classification itself: every field outside the logged set refuses.
    saved, checked = dict(current.model.to_dict()), 0
    for f in dataclasses.fields(current.model):
        if f.name in resume.LOGGED_MODEL_FIELDS:
            continue
        value = getattr(current.model, f.name)
        if f.name in STRING_ALTERNATIVES:
            new = STRING_ALTERNATIVES[f.name]
        elif value is None:
            new = 10.0
        elif isinstance(value, bool):
            new = not value
        elif isinstance(value, int):
            new = value * 2 if value > 0 else 7
        elif isinstance(value, float):
            new = value * 2
        else:
            raise AssertionError(f"no other value for {f.name}={value!r}")
        try:
            changed = dataclasses.replace(current, model=current.model.replace(**{f.name: new}))
        except Exception:
            continue  # an invalid combination: not a config a run could have
        refusing, logged = resume.model_differences(saved, "megalodon", changed)
        assert f.name in refusing and not logged, f.name
        checked += 1
    assert checked >= 25


def test_a_locked_workdir_keeps_a_second_run_out(trained, tmp_path):
    source, config = trained
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    before = sh.snapshot(workdir)
    lock = WorkdirLock(workdir)
    lock.acquire()
    try:
        with pytest.raises(WorkdirLockedError) as info:
            loop.train_and_evaluate(dataclasses.replace(config, num_train_steps=6), workdir)
    finally:
        lock.release()
    message = str(info.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message, message
    assert "in use by another training run" in message
    assert sh.snapshot(workdir) == before


_HOLDER = """
import sys, time
from megalodon_flax.training.workdir_lock import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_the_lock_names_another_process_and_dies_with_it(tmp_path):
    workdir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(workdir)],
        env=helpers.subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirLockedError, match=f"pid {holder.pid} on host"):
            WorkdirLock(workdir).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert str(holder.pid) in (workdir / ".lock").read_text()  # the stale file stays...
    lock = WorkdirLock(workdir)
    lock.acquire()  # ...and does not block: the kernel dropped the dead process's lock
    assert json.loads((workdir / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


@pytest.mark.slow
def test_resume_skips_incomplete_and_temp_folders_and_matches_a_straight_run(tmp_path, data_dirs):
    def config(steps: int):
        return sh.tiny_run_config(
            data_dirs,
            num_train_steps=steps,
            log_every_steps=1,
            checkpoint={"every_steps": 4},
            schedule={"kind": "constant", "warmup_steps": 2},  # lr independent of the total
        )

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    loop.train_and_evaluate(config(10), straight)
    loop.train_and_evaluate(config(8), resumed)
    ckpts = resumed / "checkpoints"
    (ckpts / "8" / "commit_success.txt").unlink()  # a save that never finished
    (ckpts / "6.orbax-checkpoint-tmp-123").mkdir()  # a crashed save's temp folder
    runs_before = len(helpers.event_files(resumed))
    loop.train_and_evaluate(config(10), resumed)
    rerun = helpers.event_files(resumed)[runs_before:]
    got = helpers.read_scalars(resumed, "train_loss", rerun)
    want = helpers.read_scalars(straight, "train_loss")
    assert sorted(got) == [5, 6, 7, 8, 9, 10]  # resumed from step 4, not the incomplete 8
    assert all(got[s] == want[s] for s in got), (got, want)  # bitwise
    assert sorted(p.name for p in ckpts.iterdir()) == ["10", "4", "8", "8.incomplete"]
    state = checkpointing.restore_run(resumed).params
    for a, b in zip(
        jax.tree.leaves(state),
        jax.tree.leaves(checkpointing.restore_run(straight).params),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_cli_refuses_a_narrower_model_and_keeps_config_json(tmp_path, data_dirs):
    """The issue's case: a run resumed with a narrower model; also the lock via the CLI."""
    data_dir, manual_dir = data_dirs
    data = [f"--config.data.data_dir={data_dir}", f"--config.data.manual_dir={manual_dir}"]
    workdir = tmp_path / "run"
    first = sh.run_main(
        workdir, *data, "--config.num_train_steps=2", "--config.checkpoint.every_steps=2"
    )
    assert first.returncode == 0, first.stderr[-3000:]
    before = sh.snapshot(workdir)
    proc = sh.run_main(
        workdir,
        *data,
        "--config.model.model_dim=32",
        "--config.model.value_dim=32",
        "--config.num_train_steps=4",
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = sh.error_lines(proc)
    assert len(errors) == 1 and "model_dim: 16 -> 32" in errors[0], proc.stderr[-3000:]
    assert sh.snapshot(workdir) == before
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(workdir)],
        env=helpers.subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = sh.run_main(workdir, *data, "--config.num_train_steps=4")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = sh.error_lines(proc)
    assert len(errors) == 1 and f"pid {holder.pid}" in errors[0], proc.stderr[-3000:]
    assert sh.snapshot(workdir) == before
