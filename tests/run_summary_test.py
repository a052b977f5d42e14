"""Tests of a run's summary (megalodon_flax.run_summary) from its event files.

Oracles: synthetic event files written here with clu's writer and known values (a resumed
run whose second process logs a step again, a file cut mid-record), read back through
TensorBoard's own reader for the file order.
"""

from __future__ import annotations

import shutil

import pytest

from megalodon_flax.report import summary_table
from megalodon_flax.run_summary import load_run
from tests import helpers
from tests.reference import tensorboard


def test_resumed_run_newer_values_win_and_first_windows_are_skipped(tmp_path) -> None:
    workdir = tmp_path / "resumed"
    helpers.write_events(
        workdir,
        {
            2: {"train_loss": 3.0, "seconds_per_step": 5.0},
            4: {"train_loss": 2.0, "seconds_per_step": 0.5},
        },
    )
    # The second process restarts from a checkpoint at step 2 and logs step 4 again.
    helpers.write_events(
        workdir,
        {
            4: {"train_loss": 1.5, "seconds_per_step": 4.0, "peak_memory_mb": 12.5},
            6: {"train_loss": 1.0, "seconds_per_step": 0.25, "peak_memory_mb": 10.0},
            8: {"eval_loss": 0.75, "eval_bits_per_byte": 1.25, "num_params": 123456789.0},
        },
    )
    assert len(tensorboard.files(workdir)) == 2
    run = load_run(workdir, name="r")
    assert run.series("train_loss") == {2: 3.0, 4: 1.5, 6: 1.0}
    assert run.first_window_steps["seconds_per_step"] == {2, 4}
    assert run.steady_median("seconds_per_step") == 0.25  # steps 2 and 4 compiled
    assert run.train_time_s == pytest.approx(5.0 * 2 + 4.0 * 2 + 0.25 * 2)
    assert run.peak_memory_mb == 12.5
    assert run.last_step == 8
    assert run.best("eval_bits_per_byte") == (8, 1.25)
    assert run.num_params == 123456792  # float32 scalar of 123456789
    assert run.wall_time_s is not None and run.wall_time_s >= 0

    row = helpers.markdown_tables("## S\n" + summary_table([run]) + "\n")["S"]
    assert row[0]["parameters"] == "123,456,792"
    assert row[0]["s/step (median)"] == "0.25"
    assert row[0]["train time (s)"] == "18.5"

    # A file cut mid-record (a killed writer) is read up to the damage.
    cut = tmp_path / "cut"
    cut.mkdir()
    for path in tensorboard.files(workdir):
        shutil.copy(path, cut / path.name)
    newest = max(tensorboard.files(cut), key=lambda p: p.stat().st_size)
    newest.write_bytes(newest.read_bytes()[:-7])
    partial = load_run(cut)
    assert partial.series("train_loss") == pytest.approx({2: 3.0, 4: 1.5, 6: 1.0})
