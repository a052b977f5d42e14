"""A Markdown comparison (tables, plots, samples) of finished training runs.

    python -m megalodon_flax.cli.compare --workdirs=runs/megalodon,runs/llama --out=RESULTS.md
    python -m megalodon_flax.cli.compare --workdirs=runs/a,runs/b --names=small,large \
        --out=reports/RESULTS.md --plots_dir=reports/plots --title="Width sweep"
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from megalodon_flax import report, run_summary
from megalodon_flax.cli import common

FLAGS = flags.FLAGS
flags.DEFINE_list("workdirs", None, "Training workdirs (their event files), comma-separated.")
flags.DEFINE_string("out", None, "Markdown file to write.")
flags.DEFINE_string("plots_dir", None, "Folder of the PNG plots (default: plots/ beside --out).")
flags.DEFINE_string("title", report.DEFAULT_TITLE, "Heading of the report.")
flags.DEFINE_string("intro", None, "Markdown file whose text goes under the heading.")
flags.DEFINE_list("names", None, "Run labels, comma-separated (default: workdir names).")
flags.mark_flags_as_required(["workdirs", "out"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.names is not None and len(FLAGS.names) != len(FLAGS.workdirs):
        raise app.UsageError(
            f"{len(FLAGS.names)} --names for {len(FLAGS.workdirs)} --workdirs; "
            "give one name per workdir"
        )
    names = FLAGS.names or [None] * len(FLAGS.workdirs)
    try:
        runs = [run_summary.load_run(w, n) for w, n in zip(FLAGS.workdirs, names, strict=True)]
    except FileNotFoundError as err:
        common.fail(str(err))
    intro = None
    if FLAGS.intro is not None:
        try:
            intro = Path(FLAGS.intro).read_text(encoding="utf-8")
        except OSError as err:
            common.fail(f"cannot read --intro {FLAGS.intro}: {err}")
    out = report.write_report(runs, FLAGS.out, FLAGS.plots_dir, FLAGS.title, intro)
    print(f"Wrote {out}")


if __name__ == "__main__":
    app.run(main)
