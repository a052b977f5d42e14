"""Shared by the training-safety tests: tiny runs, an independent optimizer loop, workdir
snapshots and byte surgery on checkpoint files."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from megalodon_flax.data import pipeline
from tests import factories, helpers


def tiny_run_config(data_dirs: tuple[str, str], **overrides: Any):
    """The tiny training config on a small enwik8, without evaluation, samples or profile."""
    data_dir, manual_dir = data_dirs
    base: dict[str, Any] = {
        "data": {"data_dir": data_dir, "manual_dir": manual_dir},
        "eval": {"every_steps": 1000},
        "sampling": {"every_steps": 0},
        "profile": {"num_steps": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return factories.tiny_train_config(**base)


def train_split(config) -> np.ndarray:
    """The training split the loop reads for `config`."""
    from megalodon_flax.data import enwik8

    splits = enwik8.load_enwik8_splits(
        data_dir=config.data.data_dir,
        manual_dir=config.data.manual_dir,
        allow_sample_fallback=False,
    )
    return splits["train"]


def oracle_training(
    setup, data: np.ndarray, num_steps: int, skip: Iterable[int] = ()
) -> tuple[list[tuple[float, float, bool]], Any]:
    """An independent training loop: plain mean cross-entropy, `jax.grad`, the optimizer
    applied by hand, on the batches the loop feeds (`pipeline.train_batch`).

    Steps in `skip` (1-based) are not applied: parameters and optimizer moments stay, the
    optimizer's step counts advance (the documented `nan_policy='skip'` semantics).

    Returns:
        `([(loss, grad_norm, new state finite) per step], final params)`.
    """
    config = setup.config
    model, tx = setup.model, setup.tx

    @jax.jit
    def update(params, opt_state, inputs, targets):
        def mean_loss(p):
            logits = model.apply({"params": p}, inputs)[0].astype(jnp.float32)
            logp = jax.nn.log_softmax(logits)
            return -jnp.take_along_axis(logp, targets[..., None], -1).mean()

        loss, grads = jax.value_and_grad(mean_loss)(params)
        updates, new_opt = tx.update(grads, opt_state, params)
        return loss, optax.global_norm(grads), optax.apply_updates(params, updates), new_opt

    state = jax.device_get(setup.init_state())
    params, opt_state = state.params, state.opt_state
    skip, records = set(skip), []
    for step in range(1, num_steps + 1):
        batch = pipeline.train_batch(
            data,
            step - 1,
            seq_len=config.seq_len,
            global_batch_size=config.effective_batch_size,
            seed=config.seed,
        )
        loss, norm, new_params, new_opt = jax.device_get(
            update(params, opt_state, batch["inputs"], batch["targets"])
        )
        finite = all(
            np.isfinite(x).all()
            for x in jax.tree.leaves((new_params, new_opt))
            if np.issubdtype(np.asarray(x).dtype, np.inexact)
        )
        records.append((float(loss), float(norm), bool(finite)))
        if step in skip:
            new_params = params
            new_opt = jax.tree.map(
                lambda new, old: old if np.issubdtype(np.asarray(new).dtype, np.inexact) else new,
                new_opt,
                opt_state,
            )
        params, opt_state = new_params, new_opt
    return records, params


def snapshot(root: Path) -> dict[str, str]:
    """`{relative path: sha256}` of every file under `root` (the lock file excluded)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def data_files(step_dir: Path) -> list[Path]:
    """The array data files of a checkpoint's `state` item, largest first."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: -p.stat().st_size)


def flip_bytes(path: Path, offset: int, count: int = 64) -> None:
    """Inverts `count` bytes of `path` from `offset`."""
    data = bytearray(path.read_bytes())
    for i in range(offset, min(offset + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def run_main(workdir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python main.py --config=configs/smoke.py --workdir=... args` shrunk to a tiny model."""
    tiny = [
        "--config.model.model_dim=16",
        "--config.model.num_layers=1",
        "--config.model.z_dim=8",
        "--config.model.value_dim=16",
        "--config.model.ffn_hidden_dim=32",
        "--config.model.cema_ndim=2",
        "--config.model.chunk_size=8",
        "--config.model.norm_num_groups=2",
        "--config.seq_len=16",
        "--config.eval.every_steps=1000",
        "--config.sampling.every_steps=0",
    ]
    return subprocess.run(
        [
            sys.executable,
            str(helpers.REPO_ROOT / "main.py"),
            f"--config={helpers.REPO_ROOT / 'configs' / 'smoke.py'}",
            f"--workdir={workdir}",
            *tiny,
            *args,
        ],
        cwd=helpers.REPO_ROOT,
        env=helpers.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The `error: ...` lines of a CLI's stderr."""
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
