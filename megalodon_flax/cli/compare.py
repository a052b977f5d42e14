"""A Markdown comparison (tables, plots, samples) of finished training runs.

    python -m megalodon_flax.cli.compare --workdirs=runs/megalodon,runs/llama --out=RESULTS.md
    python -m megalodon_flax.cli.compare --workdirs=runs/a,runs/b --names=small,large \
        --out=reports/RESULTS.md --plots_dir=reports/plots --title="Width sweep"
    python -m megalodon_flax.cli.compare --workdirs=runs/a,runs/b --out=RESULTS.md \
        --intro=results/intro.md --appendix=results/long_context.md   # text before/after

Every argument is checked when the flags are parsed, before any run is read; a bad one ends
the program with one line naming the flag. Missing folders of --out and --plots_dir are
created.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from megalodon_flax import report, run_summary
from megalodon_flax.cli import arguments, common

FLAGS = flags.FLAGS


define_flags = arguments.define_compare_flags


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        common.fail(f"unexpected arguments: {argv[1:]}")
    names = FLAGS.names or [None] * len(FLAGS.workdirs)
    try:
        runs = [run_summary.load_run(w, n) for w, n in zip(FLAGS.workdirs, names, strict=True)]
    except FileNotFoundError as err:
        common.fail(str(err))
    intro = None if FLAGS.intro is None else _read("--intro", FLAGS.intro)
    appendix = [_read("--appendix", path) for path in FLAGS.appendix]
    out = report.write_report(runs, FLAGS.out, FLAGS.plots_dir, FLAGS.title, intro, appendix)
    print(f"Wrote {out}")


def _read(flag: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        common.fail(f"cannot read {flag} {path}: {err}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=common.parse_checked_flags)
