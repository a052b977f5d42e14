"""Tests of the run comparison report: two tiny real runs, synthetic event files, the CLI.

The package reads event files with its own decoder (`megalodon_flax.event_files`); the
oracles here are TensorBoard's `EventAccumulator`, used directly, and synthetic event files
written in the tests with known values.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import _train_utils as tu
import numpy as np
import pytest

from megalodon_flax import event_files
from megalodon_flax.report import BPB_PLOT, summary_table, write_report
from megalodon_flax.run_summary import load_run
from megalodon_flax.training import loop

REAL_RUNS = ("seed1", "seed2")
NUM_STEPS = 8
EVAL_STEPS = [4, 8]
# A sample that would break a naive fence: backtick fences inside, a NUL byte.
SPARSE_SAMPLE = "prompt ```python\nx = 1\n```\x00 tail"
SPARSE_SAMPLE_RENDERED = "```\nprompt ` ` `python\nx = 1\n` ` `\\x00 tail\n```"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------- the oracle: TensorBoard's reader
def _tb_files(workdir: Path) -> list[Path]:
    """Event files of `workdir`, oldest first by the wall time of their first summary.

    The name's time field and the file-version event have whole seconds only, and a process
    opens several writers within one second here.
    """
    from tensorboard.backend.event_processing import event_accumulator

    def start(path: Path) -> float:
        acc = event_accumulator.EventAccumulator(
            str(path), size_guidance={event_accumulator.TENSORS: 0}
        )
        acc.Reload()
        return min(e.wall_time for tag in acc.Tags()["tensors"] for e in acc.Tensors(tag))

    return sorted(Path(workdir).glob("events.out.tfevents.*"), key=start)


def _tb_tensors(workdir: Path, tag: str):
    """`(step, ndarray)` of every `tag` event, file by file, via TensorBoard's accumulator."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    for path in _tb_files(workdir):
        acc = event_accumulator.EventAccumulator(
            str(path), size_guidance={event_accumulator.TENSORS: 0}
        )
        acc.Reload()
        if tag in acc.Tags()["tensors"]:
            for event in acc.Tensors(tag):
                yield event.step, tensor_util.make_ndarray(event.tensor_proto)


def tb_scalars(workdir: Path, tag: str) -> dict[int, float]:
    """`{step: value}` of a scalar, the later file winning (TensorBoard's reader)."""
    return {step: float(value) for step, value in _tb_tensors(workdir, tag)}


def tb_texts(workdir: Path, tag: str = "sample") -> dict[int, str]:
    """`{step: text}` of a text summary (TensorBoard's reader)."""
    return {
        step: np.asarray(value).reshape(-1)[0].decode("utf-8")
        for step, value in _tb_tensors(workdir, tag)
    }


def _compare_cli(*args: str) -> subprocess.CompletedProcess:
    """Runs `python -m megalodon_flax.cli.compare` with absl flags."""
    return subprocess.run(
        [sys.executable, "-m", "megalodon_flax.cli.compare", *args],
        cwd=tu.REPO_ROOT,
        env=tu.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _write_events(workdir: Path, scalars: dict[int, dict[str, float]], texts=None) -> None:
    """Writes scalars (and texts) with clu's writer, the way the training loop does."""
    from clu import metric_writers

    writer = metric_writers.create_default_writer(str(workdir), asynchronous=False)
    for step, values in scalars.items():
        writer.write_scalars(step, values)
    for step, values in (texts or {}).items():
        writer.write_texts(step, values)
    writer.flush()
    writer.close()


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory) -> dict[str, Path]:
    """Two real 8-step runs (different seeds) and a sparse synthetic one."""
    root = tmp_path_factory.mktemp("compare")
    data_dir, manual_dir = tu.make_enwik8_dirs(root / "data")
    dirs = {}
    for seed, name in enumerate(REAL_RUNS, start=1):
        config = tu.tiny_config(
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
    _write_events(
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


def _tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """The first table under each `## heading`, as rows keyed by the header cells."""
    tables: dict[str, list[dict[str, str]]] = {}
    heading = None
    lines: list[str] = []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("## "):
            heading = line[3:].strip()
        elif line.startswith("|"):
            lines.append(line)
        elif lines:
            cells = [[c.strip() for c in re.split(r"(?<!\\)\|", ln.strip()[1:-1])] for ln in lines]
            header, body = cells[0], cells[2:]
            assert all(set(c) <= set("-:") for c in cells[1])
            tables.setdefault(heading, [dict(zip(header, row, strict=True)) for row in body])
            lines = []
    return tables


def _median_steady(values: dict[int, float]) -> float:
    """Median without the first window (one process per run here)."""
    steady = [v for s, v in values.items() if s != min(values)]
    return float(np.median(steady or list(values.values())))


def _wall_time(workdir: Path) -> float:
    """First to last event of each file, through tensorboard's accumulator."""
    from tensorboard.backend.event_processing import event_accumulator

    total = 0.0
    for path in _tb_files(workdir):
        acc = event_accumulator.EventAccumulator(
            str(path), size_guidance={event_accumulator.TENSORS: 0}
        )
        acc.Reload()
        last = max(e.wall_time for tag in acc.Tags()["tensors"] for e in acc.Tensors(tag))
        total += last - acc.FirstEventTimestamp()
    return total


def _fmt(values: dict[int, float], reduce, spec: str) -> str:
    return "n/a" if not values else format(reduce(values), spec)


def test_load_run_matches_tensorboard_reader(workdirs) -> None:
    for name in REAL_RUNS:
        run = load_run(workdirs[name])
        assert run.name == name
        assert run.config["seed"] == REAL_RUNS.index(name) + 1
        for tag in (*tu.TRAIN_SCALARS, *tu.EVAL_SCALARS, "seconds_per_step", "num_params"):
            want = tb_scalars(workdirs[name], tag)
            assert want, tag
            assert run.series(tag) == pytest.approx(want, rel=1e-7), tag
            assert event_files.read_scalars(workdirs[name], tag) == pytest.approx(want, rel=1e-7)
        assert sorted(run.series("train_loss")) == [2, 4, 6, 8]
        assert sorted(run.series("eval_loss")) == EVAL_STEPS
        assert run.texts["sample"] == tb_texts(workdirs[name])
        assert event_files.read_texts(workdirs[name]) == tb_texts(workdirs[name])
        assert run.last_sample == (NUM_STEPS, tb_texts(workdirs[name])[NUM_STEPS])
    runs = [load_run(workdirs[n]) for n in REAL_RUNS]
    assert runs[0].series("train_loss") != runs[1].series("train_loss")  # the seeds differ


def test_summary_table_matches_event_files(workdirs, report) -> None:
    rows = {r["run"]: r for r in _tables(report.read_text())["Summary"]}
    assert list(rows) == [*REAL_RUNS, "sparse"]
    for name in REAL_RUNS:
        workdir, row = workdirs[name], rows[name]

        def scalars(tag: str, workdir: Path = workdir) -> dict[int, float]:
            return tb_scalars(workdir, tag)

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
        assert wall == pytest.approx(_wall_time(workdir), abs=0.051)
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

    setup = {r["run"]: r for r in _tables(report.read_text())["Setup"]}
    assert setup["seed1"]["tokens trained"] == f"{NUM_STEPS * 8 * 16:,}"
    assert setup["sparse"]["seq_len"] == "n/a"


def test_eval_table_has_every_step_of_every_run(workdirs, report) -> None:
    rows = _tables(report.read_text())["Validation by step"]
    assert [r["step"] for r in rows] == ["4", "5", "8"]
    for row in rows:
        step = int(row["step"])
        for name in REAL_RUNS:
            for tag, label in (("eval_loss", "loss"), ("eval_bits_per_byte", "bpb")):
                values = tb_scalars(workdirs[name], tag)
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
    prompt = tu.tiny_config().sampling.prompt
    for name in REAL_RUNS:
        heading = f"### {name} (step {NUM_STEPS})\n\n```\n"
        assert heading in samples
        block = samples[samples.index(heading) + len(heading) :]
        assert block.startswith(prompt)
        assert tb_texts(workdirs[name])[NUM_STEPS].startswith(prompt)


def test_cli_subprocess_with_names_title_and_plots_dir(workdirs, tmp_path) -> None:
    out = tmp_path / "reports" / "out.md"
    intro = tmp_path / "intro.md"
    intro.write_text("Two *tiny* runs.\n")
    proc = _compare_cli(
        f"--workdirs={workdirs['seed1']},{workdirs['sparse']}",
        "--names=A,B",
        f"--out={out}",
        f"--plots_dir={tmp_path / 'figs'}",
        "--title=Tiny runs",
        f"--intro={intro}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Tiny runs\n\nTwo *tiny* runs.\n\n## Setup\n")
    assert [r["run"] for r in _tables(text)["Summary"]] == ["A", "B"]
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


def test_resumed_run_newer_values_win_and_first_windows_are_skipped(tmp_path) -> None:
    workdir = tmp_path / "resumed"
    _write_events(
        workdir,
        {
            2: {"train_loss": 3.0, "seconds_per_step": 5.0},
            4: {"train_loss": 2.0, "seconds_per_step": 0.5},
        },
    )
    # The second process restarts from a checkpoint at step 2 and logs step 4 again.
    _write_events(
        workdir,
        {
            4: {"train_loss": 1.5, "seconds_per_step": 4.0, "peak_memory_mb": 12.5},
            6: {"train_loss": 1.0, "seconds_per_step": 0.25, "peak_memory_mb": 10.0},
            8: {"eval_loss": 0.75, "eval_bits_per_byte": 1.25, "num_params": 123456789.0},
        },
    )
    assert len(_tb_files(workdir)) == 2
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

    row = _tables("## S\n" + summary_table([run]) + "\n")["S"]
    assert row[0]["parameters"] == "123,456,792"
    assert row[0]["s/step (median)"] == "0.25"
    assert row[0]["train time (s)"] == "18.5"

    # A file cut mid-record (a killed writer) is read up to the damage.
    cut = tmp_path / "cut"
    cut.mkdir()
    for path in _tb_files(workdir):
        shutil.copy(path, cut / path.name)
    newest = max(_tb_files(cut), key=lambda p: p.stat().st_size)
    newest.write_bytes(newest.read_bytes()[:-7])
    partial = load_run(cut)
    assert partial.series("train_loss") == pytest.approx({2: 3.0, 4: 1.5, 6: 1.0})


def test_event_file_reader_returns_what_clu_wrote(tmp_path) -> None:
    """`event_files.read_scalars` / `read_texts` against values written here with clu's writer:
    two processes (the later file wins), an hparams summary, and cuts of the last file."""
    from clu import metric_writers

    pattern = "events.out.tfevents.*"
    workdir = tmp_path / "w"
    _write_events(workdir, {1: {"a": 0.5, "b": -2.0}, 2: {"a": 0.25}}, {2: {"sample": "first"}})
    (first,) = workdir.glob(pattern)
    # A second process resumes at step 2; the file size after each flushed step marks where
    # that step's records end.
    writer = metric_writers.create_default_writer(str(workdir), asynchronous=False)
    writer.write_hparams({"learning_rate": 0.5, "schedule": "cosine"})
    writer.flush()
    (second,) = set(workdir.glob(pattern)) - {first}
    later = [
        (2, {"a": 0.125}, "h\u00e9llo \u2713 ```"),
        (3, {"a": 1.5, "b": 3.0}, None),
        (4, {"b": 2.75}, "last"),
    ]
    ends = [second.stat().st_size]
    for step, scalars, text in later:
        writer.write_scalars(step, scalars)
        if text is not None:
            writer.write_texts(step, {"sample": text})
        writer.flush()
        ends.append(second.stat().st_size)
    writer.close()

    def expected(num_later: int, tag: str) -> dict:
        values = {1: {"a": 0.5, "b": -2.0}, 2: {"a": 0.25}}
        texts = {2: "first"}
        for step, scalars, text in later[:num_later]:
            values.setdefault(step, {}).update(scalars)
            if text is not None:
                texts[step] = text
        if tag == "sample":
            return texts
        return {step: v[tag] for step, v in values.items() if tag in v}

    assert event_files.event_files(workdir) == [first, second]
    assert event_files.read_scalars(workdir, "a") == expected(3, "a") == {1: 0.5, 2: 0.125, 3: 1.5}
    assert event_files.read_scalars(workdir, "b") == expected(3, "b")
    assert event_files.read_scalars(workdir, "a", files=[first]) == {1: 0.5, 2: 0.25}
    assert event_files.read_scalars(workdir, "no_such_tag") == {}
    assert event_files.read_texts(workdir) == expected(3, "sample")
    assert event_files.read_texts(workdir, "no_such_tag") == {}
    # TensorBoard's own reader agrees.
    assert tb_scalars(workdir, "a") == expected(3, "a")
    assert tb_texts(workdir) == expected(3, "sample")

    # The writers' names as the 10th and 11th writer of one process within one second give
    # them: `...<second>.<host>.<pid>.9.v2` was started before `....10.v2`.
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    stem = "events.out.tfevents.1700000000.host.4242"
    shutil.copy(first, renamed / f"{stem}.9.v2")
    shutil.copy(second, renamed / f"{stem}.10.v2")
    names = [p.name for p in event_files.event_files(renamed)]
    assert names == [f"{stem}.9.v2", f"{stem}.10.v2"]
    assert event_files.read_scalars(renamed, "a") == expected(3, "a")
    assert event_files.read_texts(renamed) == expected(3, "sample")
    assert load_run(renamed).series("a") == expected(3, "a")
    assert load_run(renamed).texts["sample"] == expected(3, "sample")

    # A killed writer leaves the last file cut anywhere: whole steps survive, a cut record and
    # what follows it are dropped, nothing raises.
    data = second.read_bytes()
    assert ends[-1] == len(data)
    for num_later, end in enumerate(ends):
        last = num_later == len(later)
        cuts = [end] if last else [end, end + 5, end + 20, ends[num_later + 1] - 1]
        for cut in cuts:
            cut_dir = tmp_path / f"cut_{cut}"
            cut_dir.mkdir()
            shutil.copy(first, cut_dir / first.name)
            (cut_dir / second.name).write_bytes(data[:cut])
            for tag in ("a", "b"):
                got = event_files.read_scalars(cut_dir, tag)
                if cut == end:
                    assert got == expected(num_later, tag), (cut, tag)
                else:  # inside the next step: its record of `tag` is whole or dropped
                    assert got in (expected(num_later, tag), expected(num_later + 1, tag)), cut
            if cut == end:
                assert event_files.read_texts(cut_dir) == expected(num_later, "sample"), cut
    empty = tmp_path / "cut_all"
    empty.mkdir()
    (empty / second.name).write_bytes(data[:7])  # not even a record header
    assert event_files.read_scalars(empty, "a") == {} and event_files.read_texts(empty) == {}


def test_stream_columns_appear_when_logged(tmp_path) -> None:
    workdir = tmp_path / "s1"
    _write_events(
        workdir,
        {4: {"eval_stream_loss": 0.5, "eval_stream_bits_per_byte": 0.75, "eval_loss": 0.625}},
    )
    out = write_report([load_run(workdir)], tmp_path / "r.md")
    tables = _tables(out.read_text())
    assert tables["Summary"][0]["final stream bpb"] == "0.7500 (step 4)"
    assert tables["Streaming validation by step"] == [
        {"step": "4", "s1 stream loss": "0.5000", "s1 stream bpb": "0.7500"}
    ]
    assert math.isclose(load_run(workdir).final("eval_loss")[1], 0.625)
    assert (tmp_path / "plots" / BPB_PLOT).stat().st_size > 0
