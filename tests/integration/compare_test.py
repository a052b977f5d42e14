"""The run comparison report of two tiny real runs and a synthetic one, through the CLI
(`python -m megalodon_flax.cli.compare`).

The package reads event files with its own decoder (`megalodon_flax.event_files`); the
oracles here are TensorBoard's `EventAccumulator`, used directly
(`tests/reference/tensorboard.py`), and synthetic event files written with known values.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megalodon_flax import event_files
from megalodon_flax.run_summary import load_run
from megalodon_flax.training import loop
from tests import helpers
from tests.factories import tiny_train_config
from tests.reference import tensorboard

REAL_RUNS = ("seed1", "seed2")
NUM_STEPS = 8
EVAL_STEPS = [4, 8]
# A sample that would break a naive fence: backtick fences inside, a NUL byte.
SPARSE_SAMPLE = "prompt ```python\nx = 1\n```\x00 tail"
SPARSE_SAMPLE_RENDERED = "```\nprompt ` ` `python\nx = 1\n` ` `\\x00 tail\n```"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _compare_cli(*args: str) -> subprocess.CompletedProcess:
    """Runs `python -m megalodon_flax.cli.compare` with absl flags."""
    return subprocess.run(
        [sys.executable, "-m", "megalodon_flax.cli.compare", *args],
        cwd=helpers.REPO_ROOT,
        env=helpers.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory) -> dict[str, Path]:
    """Two real 8-step runs (different seeds) and a sparse synthetic one."""
    root = tmp_path_factory.mktemp("compare")
    data_dir, manual_dir = helpers.make_enwik8_dirs(root / "data")
    dirs = {}
    for seed, name in enumerate(REAL_RUNS, start=1):
        config = tiny_train_config(
            data={"data_dir": data_dir, "manual_dir": manual_dir},
            seed=seed,
            num_train_steps=NUM_STEPS,
            log_every_steps=2,
            eval={"every_steps": 4},
            checkpoint={"every_steps": NUM_STEPS},
            sampling={"every_steps": NUM_STEPS},
            profile={"num_steps": 0},
        )
        dirs[name] = root / name
        loop.train_and_evaluate(config, str(dirs[name]))
    dirs["sparse"] = root / "sparse"
    helpers.write_events(
        dirs["sparse"],
        {3: {"train_loss": 2.5}, 5: {"train_loss": 2.25, "eval_loss": 1.875}},
        {5: {"sample": SPARSE_SAMPLE}},
    )
    return dirs


@pytest.fixture(scope="module")
def report(workdirs, tmp_path_factory) -> Path:
    """The report of the three runs via the CLI, with the default names and plots folder."""
    out = tmp_path_factory.mktemp("report") / "RESULTS.md"
    workdir_list = ",".join(str(workdirs[k]) for k in (*REAL_RUNS, "sparse"))
    proc = _compare_cli(f"--workdirs={workdir_list}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Wrote {out}" in proc.stdout
    return out


def _median_steady(values: dict[int, float]) -> float:
    """Median without the first window (one process per run here)."""
    steady = [v for s, v in values.items() if s != min(values)]
    return float(np.median(steady or list(values.values())))


def _fmt(values: dict[int, float], reduce, spec: str) -> str:
    return "n/a" if not values else format(reduce(values), spec)


def test_load_run_matches_tensorboard_reader(workdirs) -> None:
    for name in REAL_RUNS:
        run = load_run(workdirs[name])
        assert run.name == name
        assert run.config["seed"] == REAL_RUNS.index(name) + 1
        for tag in (
            *helpers.TRAIN_SCALARS,
            *helpers.EVAL_SCALARS,
            "seconds_per_step",
            "num_params",
        ):
            want = tensorboard.scalars(workdirs[name], tag)
            assert want, tag
            assert run.series(tag) == pytest.approx(want, rel=1e-7), tag
            assert event_files.read_scalars(workdirs[name], tag) == pytest.approx(want, rel=1e-7)
        assert sorted(run.series("train_loss")) == [2, 4, 6, 8]
        assert sorted(run.series("eval_loss")) == EVAL_STEPS
        assert run.texts["sample"] == tensorboard.texts(workdirs[name])
        assert event_files.read_texts(workdirs[name]) == tensorboard.texts(workdirs[name])
        assert run.last_sample == (NUM_STEPS, tensorboard.texts(workdirs[name])[NUM_STEPS])
    runs = [load_run(workdirs[n]) for n in REAL_RUNS]
    assert runs[0].series("train_loss") != runs[1].series("train_loss")  # the seeds differ


def test_summary_table_matches_event_files(workdirs, report) -> None:
    rows = {r["run"]: r for r in helpers.markdown_tables(report.read_text())["Summary"]}
    assert list(rows) == [*REAL_RUNS, "sparse"]
    for name in REAL_RUNS:
        workdir, row = workdirs[name], rows[name]

        def scalars(tag: str, workdir: Path = workdir) -> dict[int, float]:
            return tensorboard.scalars(workdir, tag)

        config = load_run(workdir).config
        assert row["model family"] == config.get("model_family", "megalodon")
        params = scalars("num_params")
        assert row["parameters"] == _fmt(params, lambda v: round(v[max(v)]), ",")
        assert row["steps"] == str(NUM_STEPS)
        eval_loss, eval_bpb = scalars("eval_loss"), scalars("eval_bits_per_byte")
        assert sorted(eval_bpb) == EVAL_STEPS
        assert row["final val loss"] == f"{eval_loss[max(eval_loss)]:.4f}"
        assert row["final val bpb"] == f"{eval_bpb[max(eval_bpb)]:.4f}"
        best_step = min(eval_bpb, key=eval_bpb.get)
        assert row["best val bpb"] == f"{min(eval_bpb.values()):.4f} (step {best_step})"
        assert row["s/step (median)"] == _fmt(scalars("seconds_per_step"), _median_steady, ".4g")
        assert row["tokens/s (median)"] == _fmt(scalars("tokens_per_sec"), _median_steady, ",.0f")
        assert row["tokens/s (median)"] != "n/a"
        peak = scalars("peak_memory_mb")
        assert row["peak memory (MiB)"] == _fmt(peak, lambda v: max(v.values()), ",.1f")
        seconds = scalars("seconds_per_step")
        steps = sorted(seconds)
        windows = zip(steps, [0, *steps[:-1]], strict=True)
        train_time = sum(seconds[s] * (s - prev) for s, prev in windows)
        assert row["train time (s)"] == ("n/a" if not seconds else f"{train_time:,.1f}")
        wall = float(row["wall time (s)"].replace(",", ""))
        assert wall == pytest.approx(tensorboard.wall_time(workdir), abs=0.051)
        assert wall > 0

    sparse = rows["sparse"]
    assert sparse["steps"] == "5"
    assert sparse["final val loss"] == "1.8750"
    for column in (
        "model family",
        "parameters",
        "final val bpb",
        "best val bpb",
        "s/step (median)",
        "tokens/s (median)",
        "peak memory (MiB)",
        "train time (s)",
    ):
        assert sparse[column] == "n/a", column

    setup = {r["run"]: r for r in helpers.markdown_tables(report.read_text())["Setup"]}
    assert setup["seed1"]["tokens trained"] == f"{NUM_STEPS * 8 * 16:,}"
    assert setup["sparse"]["seq_len"] == "n/a"


def test_eval_table_has_every_step_of_every_run(workdirs, report) -> None:
    rows = helpers.markdown_tables(report.read_text())["Validation by step"]
    assert [r["step"] for r in rows] == ["4", "5", "8"]
    for row in rows:
        step = int(row["step"])
        for name in REAL_RUNS:
            for tag, label in (("eval_loss", "loss"), ("eval_bits_per_byte", "bpb")):
                values = tensorboard.scalars(workdirs[name], tag)
                want = f"{values[step]:.4f}" if step in values else "n/a"
                assert row[f"{name} val {label}"] == want, (name, step, tag)
        assert row["sparse val loss"] == ("1.8750" if step == 5 else "n/a")
        assert row["sparse val bpb"] == "n/a"
    assert "Streaming validation by step" not in report.read_text()


def test_plots_are_linked_and_valid_pngs(report) -> None:
    import matplotlib.image

    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())
    assert links == ["plots/loss_curves.png", "plots/bits_per_byte.png"]
    for link in links:
        path = report.parent / link
        data = path.read_bytes()
        assert len(data) > len(PNG_SIGNATURE) and data[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0
        assert image.shape[2] in (3, 4)
        assert np.ptp(image[..., :3]) > 0  # not a blank canvas


def test_samples_are_fenced_safely(workdirs, report) -> None:
    text = report.read_text()
    samples = text[text.index("## Samples") :]
    assert SPARSE_SAMPLE_RENDERED in samples
    assert "### sparse (step 5)" in samples
    fences = [ln for ln in text.splitlines() if ln.startswith("```")]
    assert all(ln == "```" for ln in fences) and len(fences) == 2 * 3
    prompt = tiny_train_config().sampling.prompt
    for name in REAL_RUNS:
        heading = f"### {name} (step {NUM_STEPS})\n\n```\n"
        assert heading in samples
        block = samples[samples.index(heading) + len(heading) :]
        assert block.startswith(prompt)
        assert tensorboard.texts(workdirs[name])[NUM_STEPS].startswith(prompt)


def test_cli_subprocess_with_names_title_and_plots_dir(workdirs, tmp_path) -> None:
    out = tmp_path / "reports" / "out.md"
    intro = tmp_path / "intro.md"
    intro.write_text("Two *tiny* runs.\n")
    appendix = [tmp_path / "a.md", tmp_path / "b.md"]
    appendix[0].write_text("## Long context\n\nFirst.\n")
    appendix[1].write_text("| x |\n| --- |\n| 1 |\n")
    proc = _compare_cli(
        f"--workdirs={workdirs['seed1']},{workdirs['sparse']}",
        "--names=A,B",
        f"--out={out}",
        f"--plots_dir={tmp_path / 'figs'}",
        "--title=Tiny runs",
        f"--intro={intro}",
        f"--appendix={appendix[0]},{appendix[1]}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Tiny runs\n\nTwo *tiny* runs.\n\n## Setup\n")
    assert text.endswith("\n\n## Long context\n\nFirst.\n\n| x |\n| --- |\n| 1 |\n")
    assert text.index("## Samples") < text.index("## Long context")
    assert [r["run"] for r in helpers.markdown_tables(text)["Summary"]] == ["A", "B"]
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["../figs/loss_curves.png", "../figs/bits_per_byte.png"]
    assert all((out.parent / link).is_file() for link in links)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The CLI failed with status 1 and exactly one `error: ...` line, no traceback."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_missing_or_empty_workdir_is_a_clear_error(workdirs, tmp_path) -> None:
    missing = tmp_path / "no_such_run"
    with pytest.raises(FileNotFoundError, match="no_such_run"):
        load_run(missing)
    report_path = tmp_path / "r.md"
    proc = _compare_cli(f"--workdirs={workdirs['sparse']},{missing}", f"--out={report_path}")
    assert "no_such_run" in _one_error_line(proc)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no TensorBoard event files.*empty_run"):
        load_run(empty)
    proc = _compare_cli(f"--workdirs={empty}", f"--out={report_path}")
    assert re.search(r"no TensorBoard event files.*empty_run", _one_error_line(proc))
    proc = _compare_cli(f"--workdirs={workdirs['sparse']}", "--names=a,b", f"--out={empty}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "one name per workdir" in proc.stderr
    assert not report_path.exists()
    assert list(empty.iterdir()) == []
