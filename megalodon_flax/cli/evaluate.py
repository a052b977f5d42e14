"""Bits per byte of a trained run over a whole split, streaming or in fixed windows.

python -m megalodon_flax.cli.evaluate --workdir=runs/megalodon --split=test --mode=stream
python -m megalodon_flax.cli.evaluate --workdir=runs/megalodon --split=test --mode=window
python -m megalodon_flax.cli.evaluate --workdir=runs/megalodon --also=runs/llama --mode=context \
    --out_dir=runs/context_curve      # bits per byte by position: table, JSON and plot

Every argument is checked when the flags are parsed, before the run is loaded; a bad one
ends the program with one line naming the flag.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags, logging

from megalodon_flax import context_curve, evaluation, families
from megalodon_flax.cli import arguments, common
from megalodon_flax.data import enwik8, pipeline
from megalodon_flax.training import checkpointing

FLAGS = flags.FLAGS
# Flags of --mode=stream -> the value that leaves them off (with --mode=window: a warning).
_STREAM_ONLY = {"call_length": 0, "num_streams": 1}
# Flags of --mode=context -> the value that leaves them off.
_CONTEXT_ONLY = {"also": [], "protocol": "both", "stride": 0, "out_dir": None}
Curves = dict[str, context_curve.PositionLosses]


def _ignored_flags() -> list[str]:
    """The flags given a value that the chosen mode does not use."""
    unused = dict(_CONTEXT_ONLY) if FLAGS.mode != "context" else {}
    if FLAGS.mode == "window":
        unused.update(_STREAM_ONLY)
    return [f"--{k}" for k, off in unused.items() if FLAGS[k].value != off]


def progress_logger(label: str) -> evaluation.ProgressFn:
    """A progress callback logging done/total, the rate and the time left, every 5%."""
    start = time.perf_counter()
    state = {"next": 0}

    def progress(done: int, total: int) -> None:
        if done < state["next"] and done != total:
            return
        state["next"] = done + max(total // 20, 1)
        elapsed = time.perf_counter() - start
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (total - done) / rate if rate > 0 else float("nan")
        logging.info(
            "%s: %d/%d (%.0f%%), %.0f/s, ETA %s",
            label,
            done,
            total,
            100.0 * done / max(total, 1),
            rate,
            time.strftime("%H:%M:%S", time.gmtime(left)) if left == left else "?",
        )

    return progress


define_flags = arguments.define_evaluate_flags


def _split_bytes(run: checkpointing.TrainedRun) -> np.ndarray:
    data_config = run.config.data
    if data_config.tokenizer is not None:
        common.fail(
            f"evaluate scores enwik8 bytes, but this run reads tokens of {data_config.tokenizer}; "
            "its held-out evaluation (eval_bits_per_byte) is in its training logs"
        )
    if data_config.source != "enwik8":
        common.fail(
            "evaluate scores enwik8 bytes, but this run trained on "
            f"data.source={data_config.source!r} ({data_config.text_paths}); its held-out "
            "documents are evaluated in its training logs (eval_*)"
        )
    try:
        data = enwik8.load_enwik8_splits(
            data_config.data_dir, data_config.manual_dir, data_config.allow_sample_fallback
        )[FLAGS.split]
    except (enwik8.Enwik8UnavailableError, enwik8.Enwik8FileError) as err:
        common.fail(str(err))
    return data[: FLAGS.max_bytes or None]


def _curves_of(workdir: str, run: checkpointing.TrainedRun) -> Curves:
    """The context curves of one run: its protocols if it carries its state, else the
    sliding window at its training length."""
    data = _split_bytes(run)
    name = os.path.basename(os.path.normpath(workdir))
    if families.has_carried_state(run.model):
        protocols = context_curve.PROTOCOLS if FLAGS.protocol == "both" else (FLAGS.protocol,)
        return {
            f"{name} ({protocol})": context_curve.carried_position_losses(
                run.model,
                run.params,
                data,
                num_streams=FLAGS.num_streams,
                protocol=protocol,
                call_length=FLAGS.call_length or None,
                progress=progress_logger(f"{name} {protocol}"),
            )
            for protocol in protocols
        }
    window = run.config.seq_len
    curve = context_curve.windowed_position_losses(
        run.model,
        run.params,
        data,
        window=window,
        stride=FLAGS.stride or None,
        num_streams=FLAGS.num_streams,
        progress=progress_logger(f"{name} window"),
    )
    return {f"{name} ({curve.method})": curve}


def _context_mode() -> None:
    curves: Curves = {}
    steps = {}
    for workdir in [FLAGS.workdir, *FLAGS.also]:
        run = common.restore_run(workdir)
        steps[workdir] = run.step
        try:
            curves.update(_curves_of(workdir, run))
        except ValueError as err:
            common.fail(f"{workdir}: {FLAGS.split} split: {err}")
    lengths = {tuple(c.edges) for c in curves.values()}
    if len(lengths) > 1:
        common.fail("the runs read streams of different lengths (another data source?)")
    table = context_curve.markdown_table(curves)
    streams = FLAGS.num_streams
    how = (
        f"{FLAGS.split} split cut into {streams} contiguous stream(s) of equal length; "
        "each bucket pools the same positions of every stream"
    )
    payload = {
        "split": FLAGS.split,
        "num_streams": streams,
        "streams": how,
        "steps": steps,
        "curves": {name: curve.as_dict() for name, curve in curves.items()},
        "table": table,
    }
    print(table)
    if FLAGS.out_dir:
        os.makedirs(FLAGS.out_dir, exist_ok=True)
        base = os.path.join(FLAGS.out_dir, "context_curve")
        with open(base + ".json", "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2)
        with open(base + ".md", "w", encoding="utf-8") as fh:
            fh.write(f"Bits per byte by position in the stream ({how}).\n\n{table}\n")
        context_curve.write_plot(curves, base + ".png", f"{FLAGS.split}: bits per byte by position")
        logging.info("Wrote %s.{json,md,png}", base)
    else:
        print(json.dumps(payload))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        common.fail(f"unexpected arguments: {argv[1:]}")
    ignored = _ignored_flags()
    if ignored:
        logging.warning("%s: no effect with --mode=%s", " and ".join(ignored), FLAGS.mode)
    if FLAGS.mode == "context":
        _context_mode()
        return
    run = common.restore_run(FLAGS.workdir)
    if FLAGS.mode == "stream" and not families.has_carried_state(run.model):
        common.fail(
            f"{FLAGS.workdir} holds a {type(run.model).__name__}, whose context is bounded; "
            "stream evaluation needs Megalodon's carried state (use --mode=window)"
        )
    data = _split_bytes(run)
    progress = progress_logger(FLAGS.mode)
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
