"""Compares finished training runs: a Markdown report with tables, plots and samples.

Command line: `python -m megalodon_flax.cli.compare --workdirs runs/megalodon runs/llama
--out RESULTS.md`.

Each workdir is one run of `main.py`: its `config.json` and the TensorBoard event files
`events.out.tfevents.*` written by the training loop (one file per process start; when a resumed
run logs a step again, the newer value wins). The report holds

* a setup table (sequence length, batch size, gradient accumulation, tokens trained),
* a summary table, one row per run: model family, parameter count, steps trained, final and best
  validation loss / bits per byte, median seconds per step and tokens per second, peak memory,
  training and wall time,
* the validation loss and bits per byte at every evaluation step, side by side,
* links to two plots (`loss_curves.png`, `bits_per_byte.png`; default folder: `plots/` next to
  the report),
* the last text sample of each run.

Every tag is optional: a value a run did not log is shown as "n/a" and left out of the plots.
Tags read: `train_loss`, `tokens_per_sec`, `seconds_per_step`, `peak_memory_mb`, `num_params`,
`eval_loss`, `eval_bits_per_byte`, `eval_stream_loss`, `eval_stream_bits_per_byte` and the text
`sample`; any other scalar is loaded into `RunSummary.scalars` too.

The event files are decoded with TensorBoard's protocol buffers only (TensorFlow is not imported);
the plots use matplotlib's Agg canvas, imported only when plots are drawn.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from megalodon_flax.run_summary import RunSummary

LOSS_PLOT = "loss_curves.png"
BPB_PLOT = "bits_per_byte.png"
DEFAULT_TITLE = "Training run comparison"
NA = "n/a"
# Longest sample text shown in the report, in characters.
MAX_SAMPLE_CHARS = 4000


# -------------------------------------------------------------------------------- formatting
def _fmt(value: float | None, spec: str) -> str:
    if value is None or not math.isfinite(value):
        return NA
    return format(value, spec)


def _fmt_int(value: int | None) -> str:
    return NA if value is None else f"{value:,}"


def _fmt_at(point: tuple[int, float] | None, spec: str = ".4f") -> str:
    return NA if point is None else f"{_fmt(point[1], spec)} (step {point[0]})"


def _cell(text: str) -> str:
    """Makes a table cell safe: no pipes or line breaks."""
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right_from: int = 1) -> str:
    """A Markdown table; columns from `right_from` on are right-aligned."""
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = [
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "| " + " | ".join(align) + " |",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _tokens_per_step(run: RunSummary) -> int | None:
    try:
        sizes = [int(run.config.get(k)) for k in ("batch_size", "grad_accum_steps", "seq_len")]
    except (TypeError, ValueError):
        return None
    return math.prod(sizes)


def _config_cell(run: RunSummary, key: str) -> str:
    value = run.config.get(key)
    if value is None:
        return NA
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def setup_table(runs: Sequence[RunSummary]) -> str:
    """Workdir and the batch geometry of each run (from `config.json`)."""
    header = [
        "run",
        "workdir",
        "seq_len",
        "batch size",
        "grad accum",
        "num_train_steps",
        "tokens trained",
    ]
    rows = []
    for run in runs:
        per_step, steps = _tokens_per_step(run), run.last_step
        tokens = None if per_step is None or steps is None else per_step * steps
        rows.append(
            [
                run.name,
                f"`{run.workdir}`",
                _config_cell(run, "seq_len"),
                _config_cell(run, "batch_size"),
                _config_cell(run, "grad_accum_steps"),
                _config_cell(run, "num_train_steps"),
                _fmt_int(tokens),
            ]
        )
    return _table(header, rows, right_from=2)


def _has_stream(runs: Sequence[RunSummary]) -> bool:
    return any(r.series("eval_stream_bits_per_byte") or r.series("eval_stream_loss") for r in runs)


def summary_table(runs: Sequence[RunSummary]) -> str:
    """One row per run with the headline numbers (see the notes under it in the report)."""
    stream = _has_stream(runs)
    header = [
        "run",
        "model family",
        "parameters",
        "steps",
        "final val loss",
        "final val bpb",
        "best val bpb",
    ]
    if stream:
        header.append("final stream bpb")
    header += [
        "s/step (median)",
        "tokens/s (median)",
        "peak memory (MiB)",
        "train time (s)",
        "wall time (s)",
    ]
    rows = []
    for run in runs:
        final_loss = run.final("eval_loss")
        final_bpb = run.final("eval_bits_per_byte")
        row = [
            run.name,
            run.model_family or NA,
            _fmt_int(run.num_params),
            _fmt_int(run.last_step),
            _fmt(None if final_loss is None else final_loss[1], ".4f"),
            _fmt(None if final_bpb is None else final_bpb[1], ".4f"),
            _fmt_at(run.best("eval_bits_per_byte")),
        ]
        if stream:
            row.append(_fmt_at(run.final("eval_stream_bits_per_byte")))
        row += [
            _fmt(run.steady_median("seconds_per_step"), ".4g"),
            _fmt(run.steady_median("tokens_per_sec"), ",.0f"),
            _fmt(run.peak_memory_mb, ",.1f"),
            _fmt(run.train_time_s, ",.1f"),
            _fmt(run.wall_time_s, ",.1f"),
        ]
        rows.append(row)
    return _table(header, rows, right_from=2)


def eval_table(runs: Sequence[RunSummary], loss_tag: str, bpb_tag: str, label: str) -> str:
    """Loss and bits per byte at every evaluation step (the union over the runs)."""
    steps = sorted({s for r in runs for tag in (loss_tag, bpb_tag) for s in r.series(tag)})
    header = ["step"]
    for run in runs:
        header += [f"{run.name} {label} loss", f"{run.name} {label} bpb"]
    rows = []
    for step in steps:
        row = [str(step)]
        for run in runs:
            row += [
                _fmt(run.series(loss_tag).get(step), ".4f"),
                _fmt(run.series(bpb_tag).get(step), ".4f"),
            ]
        rows.append(row)
    return _table(header, rows)


def _escape_control(text: str) -> str:
    """Shows control characters other than newline and tab as `\\xNN` / `\\uNNNN`."""
    out = []
    for ch in text.replace("\r\n", "\n"):
        if ch in "\n\t" or ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return "".join(out)


def fenced_block(text: str, max_chars: int = MAX_SAMPLE_CHARS) -> str:
    """`text` in a ``` fence: control characters escaped, backtick runs broken, long text cut."""
    if len(text) > max_chars:
        text = text[:max_chars] + f"\n[... {len(text) - max_chars:,} more characters]"
    text = _escape_control(text)
    while "```" in text:
        text = text.replace("```", "` ` `")
    return f"```\n{text.rstrip(chr(10))}\n```"


# ------------------------------------------------------------------------------------- plots
def _panel(ax: Any, curves: Sequence[tuple[str, str, str, dict[int, float]]], ylabel: str) -> None:
    """Draws `(label, color, style, series)` curves, skipping empty ones."""
    from matplotlib.ticker import MaxNLocator

    drawn = 0
    for label, color, style, values in curves:
        if not values:
            continue
        steps = sorted(values)
        marker = "o" if len(steps) <= 30 else None
        ax.plot(
            steps,
            [values[s] for s in steps],
            linestyle=style,
            color=color,
            marker=marker,
            markersize=3,
            label=label,
        )
        drawn += 1
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def _curves(
    runs: Sequence[RunSummary], tag: str, stream_tag: str | None = None
) -> list[tuple[str, str, str, dict[int, float]]]:
    """`_panel` curves: `tag` of each run, solid, then `stream_tag` of each run, dashed.

    Run `i` has the color `C{i % 10}` in both.
    """
    curves = [(r.name, f"C{i % 10}", "-", r.series(tag)) for i, r in enumerate(runs)]
    if stream_tag is not None:
        curves += [
            (f"{r.name} (stream)", f"C{i % 10}", "--", r.series(stream_tag))
            for i, r in enumerate(runs)
        ]
    return curves


def write_plots(runs: Sequence[RunSummary], plots_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes `loss_curves.png` and `bits_per_byte.png`; returns `{file name: path}`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(plots_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    train_ax, val_ax = fig.subplots(1, 2)
    _panel(train_ax, _curves(runs, "train_loss"), "train loss (nats/byte)")
    train_ax.set_title("train loss")
    _panel(val_ax, _curves(runs, "eval_loss", "eval_stream_loss"), "val loss (nats/byte)")
    val_ax.set_title("validation loss")
    paths = {LOSS_PLOT: out_dir / LOSS_PLOT}
    fig.savefig(paths[LOSS_PLOT], dpi=110)

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    _panel(ax, _curves(runs, "eval_bits_per_byte", "eval_stream_bits_per_byte"), "bits per byte")
    ax.set_title("validation bits per byte")
    paths[BPB_PLOT] = out_dir / BPB_PLOT
    fig.savefig(paths[BPB_PLOT], dpi=110)
    return paths


# ------------------------------------------------------------------------------------ report
NOTES = """\
* *final*: at the last evaluation step; *best val bpb*: the lowest validation bits per byte and
  the step it was reached at; *bpb*: bits per byte, *loss*: nats per byte.
* *s/step*, *tokens/s*: medians over the logging windows, without each process's first window
  (it includes compilation) unless nothing else was logged.
* *peak memory*: the largest `peak_memory_mb` logged (device memory, or host RSS where the
  backend does not report it).
* *train time*: `seconds_per_step` × the steps of each logging window, summed: train steps only,
  compilation included, evaluation, sampling and checkpointing excluded.
* *wall time*: from the first to the last event of each process, summed over restarts.
* *n/a*: the run did not log that value."""


def render_markdown(
    runs: Sequence[RunSummary],
    out_dir: str | os.PathLike,
    plots: Mapping[str, str | os.PathLike],
    title: str = DEFAULT_TITLE,
    intro: str | None = None,
    appendix: Sequence[str] = (),
) -> str:
    """The report's Markdown; image links are relative to `out_dir`; `intro` (Markdown) goes
    under the title and each `appendix` text (Markdown) at the end, in order."""
    parts = (
        [f"# {title}"]
        + ([intro.strip()] if intro else [])
        + ["## Setup", setup_table(runs), "## Summary", summary_table(runs), NOTES]
    )
    parts += [
        "## Validation by step",
        eval_table(runs, "eval_loss", "eval_bits_per_byte", "val"),
    ]
    if _has_stream(runs):
        parts += [
            "## Streaming validation by step",
            eval_table(runs, "eval_stream_loss", "eval_stream_bits_per_byte", "stream"),
        ]
    parts.append("## Plots")
    captions = {LOSS_PLOT: "Train and validation loss", BPB_PLOT: "Validation bits per byte"}
    for key, path in plots.items():
        rel = Path(os.path.relpath(Path(path).resolve(), Path(out_dir).resolve())).as_posix()
        parts.append(f"![{captions.get(key, key)}]({rel})")
    parts.append("## Samples")
    for run in runs:
        sample = run.last_sample
        if sample is None:
            parts += [f"### {run.name}", "_No sample logged._"]
        else:
            parts += [f"### {run.name} (step {sample[0]})", fenced_block(sample[1])]
    parts += [text.strip() for text in appendix if text.strip()]
    return "\n\n".join(parts) + "\n"


def write_report(
    runs: Sequence[RunSummary],
    out_path: str | os.PathLike,
    plots_dir: str | os.PathLike | None = None,
    title: str = DEFAULT_TITLE,
    intro: str | None = None,
    appendix: Sequence[str] = (),
) -> Path:
    """Writes the plots and the Markdown report; returns the report's path.

    Args:
        runs: The runs, in table order.
        out_path: The Markdown file to write (its folder is created).
        plots_dir: Folder of the PNG plots; default: `plots/` next to `out_path`.
        title: The report's heading.
        intro: Markdown placed under the heading (how the runs were made, caveats).
        appendix: Markdown texts placed at the end, in order.
    """
    if not runs:
        raise ValueError("no runs to compare")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = write_plots(runs, out.parent / "plots" if plots_dir is None else Path(plots_dir))
    text = render_markdown(runs, out.parent, plots, title, intro, appendix)
    out.write_text(text, encoding="utf-8")
    return out
