"""Bits per byte of a trained run over a whole split, streaming or in fixed windows.

python -m megalodon_flax.cli.evaluate --workdir=runs/megalodon --split=test --mode=stream
python -m megalodon_flax.cli.evaluate --workdir=runs/megalodon --split=test --mode=window

Every argument is checked when the flags are parsed, before the run is loaded; a bad one
ends the program with one line naming the flag.
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from megalodon_flax import evaluation, families
from megalodon_flax.cli import arguments, common
from megalodon_flax.data import enwik8, pipeline

FLAGS = flags.FLAGS
# Flags of --mode=stream -> the value that leaves them off (with --mode=window: a warning).
_STREAM_ONLY = {"call_length": 0, "num_streams": 1}


def _ignored_flags() -> list[str]:
    """The stream-only flags given a value with --mode=window."""
    if FLAGS.mode != "window":
        return []
    return [f"--{k}" for k, off in _STREAM_ONLY.items() if FLAGS[k].value != off]


define_flags = arguments.define_evaluate_flags


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        common.fail(f"unexpected arguments: {argv[1:]}")
    ignored = _ignored_flags()
    if ignored:
        logging.warning("%s: no effect with --mode=window", " and ".join(ignored))
    run = common.restore_run(FLAGS.workdir)
    if FLAGS.mode == "stream" and not families.has_carried_state(run.model):
        common.fail(
            f"{FLAGS.workdir} holds a {type(run.model).__name__}, whose context is bounded; "
            "stream evaluation needs Megalodon's carried state (use --mode=window)"
        )
    data_config = run.config.data
    try:
        data = enwik8.load_enwik8_splits(
            data_config.data_dir, data_config.manual_dir, data_config.allow_sample_fallback
        )[FLAGS.split]
    except (enwik8.Enwik8UnavailableError, enwik8.Enwik8FileError) as err:
        common.fail(str(err))
    data = data[: FLAGS.max_bytes or None]

    def progress(done: int, total: int) -> None:
        if done == total or done % max(total // 20, 1) == 0:
            logging.info("%s: %d/%d", FLAGS.mode, done, total)

    try:
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
    except ValueError as err:  # a split too short for the streams or windows asked for
        common.fail(f"{FLAGS.split} split of {data.shape[0]:,} bytes: {err}")
    summary = {"workdir": FLAGS.workdir, "step": run.step, "split": FLAGS.split}
    summary.update(result.as_dict())
    print(json.dumps(summary))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=common.parse_checked_flags)
