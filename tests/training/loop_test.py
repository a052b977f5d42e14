"""Tests of the training loop (megalodon_flax.training.loop) end to end on a tiny model.

Oracles: the event files a run writes, read back (losses fall, every scalar is logged at its
steps, tokens/s × s/step = tokens per step, the logged parameter count equals the closed-form
count), the compile log (one train-step compilation), the checkpoints on disk and a rerun that
resumes rather than starting over; for the Llama baseline through the same loop, its
parameter count written out by hand (stream evaluation of held-out text_files documents:
tests/data/tokenization_test.py and tests/context_curve_test.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from megalodon_flax import families
from megalodon_flax.data import enwik8
from megalodon_flax.llama import parameter_breakdown
from megalodon_flax.training import loop
from megalodon_flax.training.config import TrainConfig
from megalodon_flax.training.setup import setup_training
from tests import helpers
from tests.factories import tiny_llama_train_mapping, tiny_train_config


# ---------------------------------------------------------------------------- end to end
def test_train_and_evaluate_end_to_end_and_resume(tmp_path: Path, enwik8_data, caplog) -> None:
    config = tiny_train_config(
        data=enwik8_data,
        num_train_steps=12,
        optimizer={"learning_rate": 1e-2},
        log_every_steps=2,
        eval={"every_steps": 6},
        checkpoint={"every_steps": 6},
        sampling={"every_steps": 6},
        profile={"num_steps": 2, "first_step": 3},
    )
    workdir = tmp_path / "run"
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            start = time.perf_counter()
            state = loop.train_and_evaluate(config, str(workdir))
            wall_time = time.perf_counter() - start
    finally:
        jax.config.update("jax_log_compiles", False)
    assert int(state.step) == 12
    compiles = [r for r in caplog.records if "Compiling" in r.getMessage()]
    assert sum("train_step" in r.getMessage() for r in compiles) == 1, [
        r.getMessage()[:120] for r in compiles
    ]

    loss = helpers.read_scalars(workdir, "train_loss")
    assert sorted(loss) == [2, 4, 6, 8, 10, 12]
    assert loss[12] < loss[2] - 0.3  # the loss falls
    for tag in helpers.TRAIN_SCALARS:
        values = helpers.read_scalars(workdir, tag)
        assert sorted(values) == [2, 4, 6, 8, 10, 12], tag
        assert all(np.isfinite(v) for v in values.values()), tag
    for tag in helpers.EVAL_SCALARS:
        assert sorted(helpers.read_scalars(workdir, tag)) == [6, 12], tag
    # Each logging window holds log_every_steps train steps, ending at the logged step; the
    # windows time train steps only, so together they fit in the measured wall time.
    step_time = helpers.read_scalars(workdir, "seconds_per_step")
    windows = dict(zip(sorted(step_time), np.diff([0, *sorted(step_time)]), strict=True))
    assert set(windows.values()) == {config.log_every_steps}
    assert all(t > 0 for t in step_time.values()), step_time
    train_time = sum(step_time[step] * windows[step] for step in step_time)
    assert train_time <= wall_time, (train_time, wall_time)
    # tokens_per_sec counts every row of every micro-batch.
    tokens_per_step = config.batch_size * config.grad_accum_steps * config.seq_len
    speed = helpers.read_scalars(workdir, "tokens_per_sec")
    for step in speed:
        assert speed[step] * step_time[step] == pytest.approx(tokens_per_step, rel=1e-4)
    assert (
        min(helpers.read_scalars(workdir, "peak_memory_mb").values()) > 10
    )  # MiB, host RSS on CPU
    expected_params = families.closed_form_parameter_count(config.model)
    assert helpers.read_scalars(workdir, "num_params") == {0: expected_params}
    bpb = helpers.read_scalars(workdir, "train_bits_per_byte")
    assert bpb[12] == pytest.approx(loss[12] / math.log(2), rel=1e-5)
    samples = helpers.read_texts(workdir)
    assert sorted(samples) == [6, 12]
    assert all(s.startswith(config.sampling.prompt) for s in samples.values())
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["12", "6"]
    hparams = helpers.read_hparams(workdir)
    assert hparams["seq_len"] == 16 and hparams["model.model_dim"] == 16
    assert hparams["model.compute_dtype"] == "float32"
    assert 12 in helpers.read_scalars(workdir, "steps_per_sec")  # ReportProgress
    traces = list((workdir / "plugins" / "profile").rglob("*.xplane.pb"))
    assert traces, "the Profile hook wrote no trace"
    saved = (workdir / "config.json").read_text()
    assert '"num_train_steps": 12' in saved and '"seq_len": 16' in saved

    # Rerunning with more steps resumes from step 12 (no step before 13 is trained again).
    config = dataclasses.replace(config, num_train_steps=14)
    runs_before = len(helpers.event_files(workdir))
    state = loop.train_and_evaluate(config, str(workdir))
    assert int(state.step) == 14
    rerun_files = helpers.event_files(workdir)[runs_before:]
    assert sorted(helpers.read_scalars(workdir, "train_loss", rerun_files)) == [14]
    loss = helpers.read_scalars(workdir, "train_loss")
    assert sorted(loss) == [2, 4, 6, 8, 10, 12, 14]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["12", "14", "6"]


def test_llama_trains_with_the_shared_loop(tmp_path: Path, enwik8_data) -> None:
    d = tiny_llama_train_mapping(
        data=enwik8_data,
        num_train_steps=12,
        log_every_steps=4,
        eval={"every_steps": 12},
    )
    config = TrainConfig.from_mapping(d)
    workdir = tmp_path / "run"
    state = loop.train_and_evaluate(config, str(workdir))
    assert int(state.step) == 12
    loss = helpers.read_scalars(workdir, "train_loss")
    assert sorted(loss) == [4, 8, 12] and loss[12] < loss[4] - 0.3
    # The count written out for this model: V·D + L·(4·D² + 3·D·F + 2·D) + D.
    v, dim, layers, f = 256, 16, 1, 32
    expected = v * dim + layers * (4 * dim * dim + 3 * dim * f + 2 * dim) + dim
    assert helpers.read_scalars(workdir, "num_params") == {0: expected}
    assert parameter_breakdown(config.model)["total"] == expected
    assert sorted(helpers.read_scalars(workdir, "eval_bits_per_byte")) == [12]
    samples = helpers.read_texts(workdir)
    assert samples and all(s.startswith(config.sampling.prompt) for s in samples.values())


def test_enwik8_pages_train_as_packed_documents(tmp_path: Path, enwik8_data) -> None:
    config = tiny_train_config(
        data={**enwik8_data, "documents": "pages"},
        num_train_steps=4,
        eval={"every_steps": 4},
        checkpoint={"every_steps": 4},
        sampling={"every_steps": 0},
    )
    workdir = tmp_path / "run"
    loop.train_and_evaluate(config, str(workdir))
    train = enwik8.load_enwik8_splits(**enwik8_data)["train"]
    _, _, data_state = helpers.restore_checkpoint(workdir, setup_training(config))
    # One document before the first <page> and one per <page> of the train split.
    assert data_state["train_iterator"]["num_documents"] == train.tobytes().count(b"<page>") + 1
    assert data_state["train_iterator"]["packed"]["parent_state"]["next_index"] > 0
    for tag in ("train_loss", "eval_loss"):
        values = helpers.read_scalars(workdir, tag)
        assert 4 in values and all(np.isfinite(v) for v in values.values()), tag
