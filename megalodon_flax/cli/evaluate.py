"""Bits per byte of a trained run over a whole split, streaming or in fixed windows.

python -m megalodon_flax.cli.evaluate --workdir=runs/megalodon --split=test --mode=stream
python -m megalodon_flax.cli.evaluate --workdir=runs/megalodon --split=test --mode=window
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from megalodon_flax import evaluation, families
from megalodon_flax.cli import common
from megalodon_flax.data import enwik8, pipeline

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
    run = common.restore_run(FLAGS.workdir)
    if FLAGS.mode == "stream" and not families.has_carried_state(run.model):
        common.fail(
            f"{FLAGS.workdir} holds a {type(run.model).__name__}, whose context is bounded; "
            "stream evaluation needs Megalodon's carried state (use --mode=window)"
        )
    data_config = run.config.data
    data = enwik8.load_enwik8_splits(
        data_config.data_dir, data_config.manual_dir, data_config.allow_sample_fallback
    )[FLAGS.split]
    data = data[: FLAGS.max_bytes or None]

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
            progress=progress,
        )
    else:
        shape = dict(seq_len=run.config.seq_len, global_batch_size=run.config.eval.batch_size)
        result = evaluation.window_eval(
            run.setup.eval_step,
            run.params,
            pipeline.eval_batches(data, **shape),
            num_batches=pipeline.num_eval_batches(data.shape[0], **shape),
            progress=progress,
        )
    summary = {"workdir": FLAGS.workdir, "step": run.step, "split": FLAGS.split}
    summary.update(result.as_dict())
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
