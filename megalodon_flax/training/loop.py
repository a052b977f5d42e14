"""The training loop: `train_and_evaluate(config, workdir)`, imported only by `cli/train`.

Top-down: data → setup (model, optimizer, jitted steps) → restore or initialize → the loop
with periodic logging, evaluation, sampling and checkpoints. Rerunning with the same workdir
resumes from the newest checkpoint (state, RNG and input position).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from megalodon_flax import evaluation, families, sampling
from megalodon_flax.data import pipeline, tokenization, training_data
from megalodon_flax.megalodon import count_params
from megalodon_flax.memory import peak_memory_mib
from megalodon_flax.training import (
    checkpoint_files,
    checkpointing,
    nonfinite,
    resume,
    workdir_lock,
)
from megalodon_flax.training.checkpointing import CHECKPOINT_SUBDIR
from megalodon_flax.training.config import TrainConfig
from megalodon_flax.training.errors import ResumeMismatchError
from megalodon_flax.training.setup import TrainingSetup, create_mesh, setup_training
from megalodon_flax.training.steps import TrainState

BYTES = tokenization.ByteTokenizer()


def generate_sample(
    setup: TrainingSetup,
    params: Any,
    step: int,
    tokenizer: tokenization.Tokenizer = BYTES,
) -> str:
    """Generates `config.sampling.length` tokens after `config.sampling.prompt` with `params`.

    The sampling key depends only on `config.seed` and `step`.

    Returns:
        The prompt followed by the generated tokens, decoded by `tokenizer` (bytes: as UTF-8,
        invalid bytes replaced).
    """
    config = setup.config
    prompt = tokenizer.encode(config.sampling.prompt.encode("utf-8"))
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), step)
    with setup.activate():
        tokens = sampling.generate(
            setup.model,
            params,
            prompt[None],
            config.sampling.length,
            rng,
            temperature=config.sampling.temperature,
            top_k=config.sampling.top_k,
            top_p=config.sampling.top_p,
        )
    tokens = np.asarray(multihost_utils.process_allgather(tokens, tiled=True))
    return tokenizer.decode(np.concatenate([prompt, tokens[0]]))


# ----------------------------------------------------------------------------- main loop
def _flat_hparams(config: TrainConfig) -> dict[str, Any]:
    out = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                visit(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, bool | int | float | str):
            out[prefix] = value
        else:
            out[prefix] = str(value)

    visit("", config.to_dict())
    return out


def _log_parameter_overview(setup: TrainingSetup, params: Any) -> int:
    """Logs the parameter tree and totals; returns the number of parameters."""
    from clu import parameter_overview

    n = count_params(params)
    expected = families.closed_form_parameter_count(setup.model_config)
    parameter_overview.log_parameter_overview(
        params, include_stats=jax.process_count() == 1, msg="Parameters"
    )
    logging.info(
        "Model: %s parameters (closed form %s); mesh %s; compute dtype %s",
        f"{n:,}",
        f"{expected:,}",
        dict(setup.mesh.shape),
        setup.model_config.compute_dtype,
    )
    return n


def train_and_evaluate(config: TrainConfig, workdir: str | epath.Path) -> TrainState:
    """Trains on enwik8 with periodic evaluation, sampling and checkpoints; resumes if possible.

    Rerunning with the same `workdir` continues from its newest complete checkpoint (state,
    RNG and input position), so an interrupted run reproduces the uninterrupted one. The run
    holds the workdir's lock throughout, and writes nothing into the workdir before the
    config was checked against the saved run (`training/resume.py`) and the checkpoint
    restored.

    Args:
        config: The validated training config.
        workdir: Directory for checkpoints, TensorBoard event files and `config.json`.

    Returns:
        The final train state.

    Raises:
        ConfigError: On a mesh that does not fit, before any work.
        ValueError: If `workdir` is a file.
        WorkdirLockedError: Another run trains in `workdir`.
        checkpointing.CheckpointError: The newest checkpoint is damaged or from another model
            (`ResumeMismatchError`), or a save failed.
        NonFiniteTrainingError: A step went non-finite with `config.nan_policy='stop'`.
    """
    workdir = checkpointing.validate_workdir(workdir)
    mesh = create_mesh(config)
    checkpointing.quiet_orbax_logs()
    setup = setup_training(config, mesh)
    with workdir_lock.locked(workdir):
        return _train_locked(config, workdir, setup)


def _checkpoint_dir(workdir: epath.Path) -> epath.Path:
    """`<workdir>/checkpoints` as an absolute path (what the checkpoint manager uses)."""
    return epath.Path(os.path.abspath(os.fspath(workdir))) / CHECKPOINT_SUBDIR


def _restore_checked(
    config: TrainConfig, workdir: epath.Path, setup: TrainingSetup
) -> tuple[int, Any, dict[str, Any]] | None:
    """Checks the run against the workdir and restores its newest complete checkpoint.

    Reads only: nothing in the workdir changes if this raises.
    """
    newest = checkpointing.latest_complete(_checkpoint_dir(workdir), warn=False)
    stored_meta = checkpointing.read_meta(newest) if newest is not None else None
    resume.check_resume(workdir, config, newest, stored_meta)
    if newest is None:
        return None
    reader = checkpointing.create_manager(
        workdir, max_to_keep=config.checkpoint.max_to_keep, async_save=False
    )
    try:
        return checkpointing.restore_latest(
            reader, setup.abstract_state, checkpointing.run_metadata(config)
        )
    finally:
        reader.close()


def _train_locked(config: TrainConfig, workdir: epath.Path, setup: TrainingSetup) -> TrainState:
    from clu import metric_writers, periodic_actions  # import TensorFlow: start-up only

    is_chief = jax.process_index() == 0
    restored = _restore_checked(config, workdir, setup)
    data = training_data.load(config, *setup.train_rows)
    logging.info("Data: %s", data.description)
    eval_data = data.eval_tokens
    position = None if restored is None else restored[2]["train_iterator"]
    try:
        train_iter = data.new_train_iterator(position)
    except ValueError as err:
        if position is None:
            raise
        raise ResumeMismatchError(f"cannot resume the input position: {err}") from err

    # Checked: from here on the workdir is written.
    if is_chief:
        checkpoint_files.set_aside_incomplete(_checkpoint_dir(workdir))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("workdir checked")
    manager = checkpointing.create_manager(
        workdir, max_to_keep=config.checkpoint.max_to_keep, async_save=config.checkpoint.async_save
    )
    config_path = checkpointing.save_config(config, workdir)
    logging.info("Config saved to %s", config_path)
    meta = checkpointing.run_metadata(config)
    if restored is None:
        state = setup.init_state()
        logging.info("Starting from scratch in %s", workdir)
    else:
        ckpt_step, state, _ = restored
        logging.info("Resuming at step %d from %s", ckpt_step, manager.directory)
    initial_step = int(jax.device_get(state.step))
    num_steps = config.num_train_steps
    effective_batch = config.effective_batch_size
    monitor = nonfinite.NonFiniteMonitor(
        config.nan_policy,
        epath.Path(manager.directory),
        None if restored is None else restored[0],
    )

    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
    if initial_step == 0:
        writer.write_hparams(_flat_hparams(config))
    num_params = _log_parameter_overview(setup, state.params)
    writer.write_scalars(initial_step, {"num_params": num_params})

    hooks = []
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=num_steps, writer=writer, every_secs=config.report_every_secs
    )
    if is_chief:
        hooks.append(report_progress)
        if config.profile.num_steps > 0:
            hooks.append(
                periodic_actions.Profile(
                    logdir=workdir,
                    num_profile_steps=config.profile.num_steps,
                    profile_duration_ms=None,
                    first_profile=config.profile.first_step,
                    every_secs=None,
                )
            )

    def save_checkpoint(step: int) -> None:
        with report_progress.timed("checkpoint"):
            checkpointing.save(
                manager,
                step,
                state,
                {"step": step, "train_iterator": train_iter.get_state()},
                meta,
            )

    # Metrics are per token; with a tokenizer, bits per byte divides by the evaluation
    # text's bytes per token (1 for bytes, where nothing changes).
    tokens_per_byte = data.eval_tokens.size / data.eval_bytes
    bytes_only = isinstance(data.tokenizer, tokenization.ByteTokenizer)

    def bits_scalars(prefix: str, bits_per_token: float) -> dict[str, float]:
        if bytes_only:
            return {f"{prefix}_bits_per_byte": bits_per_token}
        return {
            f"{prefix}_bits_per_token": bits_per_token,
            f"{prefix}_bits_per_byte": bits_per_token * tokens_per_byte,
        }

    def run_eval(step: int) -> None:
        scalars = {}
        if config.eval.mode in ("window", "both"):
            with report_progress.timed("eval"):
                batches = pipeline.eval_batches(
                    eval_data,
                    seq_len=config.seq_len,
                    global_batch_size=config.eval.batch_size,
                    max_batches=None if config.eval.num_batches == -1 else config.eval.num_batches,
                    process_index=setup.eval_rows[0],
                    process_count=setup.eval_rows[1],
                    segment_ids=data.eval_segment_ids,
                )
                result = evaluation.window_eval(setup.eval_step, state.params, batches)
            scalars.update(eval_loss=result.loss, **bits_scalars("eval", result.bits_per_byte))
        if config.eval.mode in ("stream", "both"):
            with report_progress.timed("eval_stream"):
                stream = evaluation.stream_eval(
                    setup.model,
                    state.params,
                    eval_data,
                    segment_ids=data.eval_segment_ids,
                    num_streams=config.eval.stream_num_streams,
                    max_bytes=None
                    if config.eval.stream_max_bytes == -1
                    else config.eval.stream_max_bytes,
                )
            scalars.update(
                eval_stream_loss=stream.loss, **bits_scalars("eval_stream", stream.bits_per_byte)
            )
        writer.write_scalars(step, scalars)

    def run_sample(step: int) -> None:
        with report_progress.timed("sample"):
            text = generate_sample(setup, state.params, step, data.tokenizer)
        writer.write_texts(step, {"sample": text})

    tokens_per_step = effective_batch * config.seq_len
    train_metrics = None
    last_log_time, last_log_step, paused = time.perf_counter(), initial_step, 0.0
    if initial_step >= num_steps:
        logging.info("Nothing to do: step %d >= num_train_steps %d", initial_step, num_steps)
    else:
        logging.info("Training from step %d to %d", initial_step, num_steps)
    with contextlib.ExitStack() as stack:
        # Close the checkpoint manager (waiting for a pending save) even if training fails.
        stack.callback(checkpointing.finish, manager)
        if hasattr(train_iter, "close"):
            stack.callback(train_iter.close)  # the prefetch thread
        stack.enter_context(metric_writers.ensure_flushes(writer))
        for step in range(initial_step + 1, num_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = next(train_iter)
                state, step_metrics = setup.train_step(state, batch)
                monitor.record(step, step_metrics)
                train_metrics = (
                    step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
                )
            for hook in hooks:
                hook(step)
            is_last = step == num_steps
            is_log = step % config.log_every_steps == 0 or is_last
            is_eval = step % config.eval.every_steps == 0 or is_last
            every = config.sampling.every_steps
            is_sample = bool(every) and (step % every == 0 or is_last)
            is_save = step % config.checkpoint.every_steps == 0 or is_last
            if is_log or is_eval or is_sample or is_save:
                monitor.check()  # nothing non-finite is logged, evaluated or saved
            if is_log:
                scalars = jax.device_get(train_metrics.compute())
                now = time.perf_counter()
                elapsed = max(now - last_log_time - paused, 1e-9)
                skipped = int(scalars.pop("skipped_updates"))
                for key in ("nonfinite_loss", "nonfinite_grad_norm", "nonfinite_update"):
                    scalars.pop(key)
                summary = {f"train_{k}": float(v) for k, v in scalars.items()}
                if not bytes_only:  # the in-graph metric counts tokens
                    summary["train_bits_per_token"] = summary.pop("train_bits_per_byte")
                summary["learning_rate"] = summary.pop("train_learning_rate")
                summary["grad_norm"] = summary.pop("train_grad_norm")
                if config.nan_policy == "skip":
                    summary["skipped_updates"] = skipped
                    if skipped == step - last_log_step:  # no update applied: no averages
                        for key in ("train_loss", "train_bits_per_byte", "train_loss_std"):
                            summary.pop(key, None)
                        summary.pop("train_bits_per_token", None)
                        summary.pop("grad_norm")
                summary["tokens_per_sec"] = (step - last_log_step) * tokens_per_step / elapsed
                summary["seconds_per_step"] = elapsed / (step - last_log_step)
                summary["peak_memory_mb"] = peak_memory_mib()
                writer.write_scalars(step, summary)
                train_metrics = None
                last_log_time, last_log_step, paused = now, step, 0.0
            t0 = time.perf_counter()
            if is_eval:
                run_eval(step)
            if is_sample:
                run_sample(step)
            if is_save:
                save_checkpoint(step)
                monitor.saved(step)
            paused += time.perf_counter() - t0
    skipped = f" ({monitor.skipped} updates skipped)" if monitor.skipped else ""
    logging.info("Finished at step %d%s; checkpoints in %s", num_steps, skipped, manager.directory)
    return state
