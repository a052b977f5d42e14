"""Bits per byte of a trained run over a whole split, streaming or in fixed windows.

python -m megalodon_flax.evaluate --workdir=runs/megalodon --split=test --mode=stream
python -m megalodon_flax.evaluate --workdir=runs/megalodon --split=test --mode=window
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from megalodon_flax import evaluation, models, train
from megalodon_flax.workdir import load_trained_run

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "Split to score.")
flags.DEFINE_enum(
    "mode",
    "stream",
    ["stream", "window"],
    "stream: state carried over the whole split; window: independent windows of seq_len + 1 bytes.",
)
flags.DEFINE_integer("call_length", 0, "Stream mode: tokens per call (0 = 4 chunks).")
flags.DEFINE_integer("num_streams", 1, "Stream mode: contiguous streams scored as a batch.")
flags.DEFINE_integer("max_bytes", 0, "Score only the first bytes of the split (0 = all).")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        run = load_trained_run(FLAGS.workdir)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    if FLAGS.mode == "stream" and not models.has_carried_state(run.model):
        sys.exit(
            f"error: {FLAGS.workdir} holds a {type(run.model).__name__}, whose context is "
            "bounded; stream evaluation needs Megalodon's carried state (use --mode=window)"
        )
    data = train.load_data(run.config)[FLAGS.split]
    max_bytes = FLAGS.max_bytes or None

    def progress(done: int, total: int) -> None:
        if done == total or done % max(total // 20, 1) == 0:
            logging.info("%s: %d/%d", FLAGS.mode, done, total)

    if FLAGS.mode == "stream":
        result = evaluation.stream_eval(
            run.model,
            run.params,
            data,
            call_length=FLAGS.call_length or None,
            num_streams=FLAGS.num_streams,
            max_bytes=max_bytes,
            progress=progress,
        )
    else:
        result = evaluation.window_eval(
            run.model,
            run.params,
            data,
            seq_len=run.config.seq_len,
            batch_size=run.config.eval_batch_size,
            max_bytes=max_bytes,
            progress=progress,
        )
    summary = {"workdir": FLAGS.workdir, "step": run.step, "split": FLAGS.split}
    summary.update(result.as_dict())
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
