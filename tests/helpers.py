"""Helpers shared by the tests: paths, a small enwik8, event readers, child processes.

The tiny configs live in `tests/factories.py`, the independent oracles in `tests/reference/`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from megalodon_flax.event_files import event_files as event_files
from megalodon_flax.event_files import read_scalars as read_scalars
from megalodon_flax.event_files import read_texts as read_texts

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTDATA = REPO_ROOT / "tests" / "testdata"

SAMPLE_ZIP = REPO_ROOT / "megalodon_flax" / "data" / "sample" / "enwik8.zip"
TRAIN_SCALARS = (
    "train_loss",
    "train_bits_per_byte",
    "learning_rate",
    "grad_norm",
    "tokens_per_sec",
    "seconds_per_step",
    "peak_memory_mb",
)
EVAL_SCALARS = ("eval_loss", "eval_bits_per_byte")


def make_enwik8_dirs(root: Path, num_bytes: int = 60_000) -> tuple[str, str]:
    """Writes a short real-text `enwik8.zip` (a prefix of the bundled sample) to a manual dir.

    Returns:
        `(data_dir, manual_dir)`; the first load builds the tfds dataset under `data_dir`.
    """
    with zipfile.ZipFile(SAMPLE_ZIP) as zf:
        raw = zf.read("enwik8")[:num_bytes]
    manual = root / "manual"
    manual.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(manual / "enwik8.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", raw)
    return str(root / "tfds"), str(manual)


def read_hparams(workdir: str | Path) -> dict[str, object]:
    """Returns the hyper-parameters of the first run's session-start summary."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = event_accumulator.EventAccumulator(str(event_files(workdir)[0]))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    out: dict[str, object] = {}
    for key, value in info.hparams.items():
        kind = value.WhichOneof("kind")
        out[key] = getattr(value, kind)
    return out


def restore_checkpoint(workdir: str | Path, setup):
    """`(step, state, data_state)` of the newest checkpoint in `workdir`, restored into the
    abstract state of `setup` (a `TrainingSetup`) with its run metadata; None if there is none."""
    from megalodon_flax.training import checkpointing

    manager = checkpointing.create_manager(workdir, max_to_keep=2)
    try:
        return checkpointing.restore_latest(
            manager, setup.abstract_state, checkpointing.run_metadata(setup.config)
        )
    finally:
        manager.close()


def subprocess_env(num_devices: int | None = None, **extra: str) -> dict[str, str]:
    """Environment for a child Python process: the repository on the path (so the child
    imports `tests.factories` and `tests.helpers`), `num_devices` fake CPU devices and this
    process's environment, which holds the suite's compilation cache and XLA flags
    (tests/conftest.py)."""
    env = dict(os.environ)
    paths = (str(REPO_ROOT), env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if num_devices is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
        flags.append(f"--xla_force_host_platform_device_count={num_devices}")
        env["XLA_FLAGS"] = " ".join(flags)
    env.update(extra)
    return env


def run_python(
    code: str, *, num_devices: int | None = None, timeout: float = 600, **env: str
) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter; raises with its output if it fails."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=subprocess_env(num_devices, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"subprocess failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-5000:]}\n"
            f"STDERR:\n{proc.stderr[-8000:]}"
        )
    return proc


def run_together(
    commands: list[list[str]], *, env: dict[str, str], timeout: float = 600
) -> list[subprocess.CompletedProcess]:
    """Runs `commands` at the same time (the processes of one multi-process run) and waits
    for all of them; whatever still runs `timeout` seconds after the start is killed.

    Each process writes to its own temporary files, not to pipes: a process of a collective
    run whose pipe is full (the parent reading another process) would block there, and the
    others would wait for it at their next barrier until the barrier times out.

    Returns:
        One `CompletedProcess` per command (returncode, stdout, stderr), in order.
    """
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        streams, procs = [], []
        try:
            for i, command in enumerate(commands):
                out = stack.enter_context(open(Path(tmp) / f"{i}.out", "w+"))
                err = stack.enter_context(open(Path(tmp) / f"{i}.err", "w+"))
                streams.append((out, err))
                procs.append(
                    subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=err)
                )
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=max(deadline - time.monotonic(), 0))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        results = []
        for command, p, (out, err) in zip(commands, procs, streams, strict=True):
            out.seek(0)
            err.seek(0)
            result = subprocess.CompletedProcess(command, p.returncode, out.read(), err.read())
            results.append(result)
        return results


def main_command(config_path: str | Path, workdir: str | Path, *extra: str) -> list[str]:
    """`main.py` with a config file and a workdir at full matmul precision, plus `extra` flags."""
    return [
        sys.executable,
        str(REPO_ROOT / "main.py"),
        f"--config={config_path}",
        f"--workdir={workdir}",
        "--jax_default_matmul_precision=highest",
        *extra,
    ]


def free_port() -> int:
    """A TCP port free on localhost now (for a coordinator of child processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_to_json(config) -> str:
    """Serializes a `TrainConfig` for a child process (see `config_from_json`)."""
    return json.dumps(config.to_dict())


def config_from_json(text: str):
    """Rebuilds the `TrainConfig` serialized by `config_to_json`."""
    from megalodon_flax.training.config import TrainConfig

    return TrainConfig.from_mapping(json.loads(text))


def write_events(workdir: Path, scalars: dict[int, dict[str, float]], texts=None) -> None:
    """Writes scalars (and texts) with clu's writer, the way the training loop does."""
    from clu import metric_writers

    writer = metric_writers.create_default_writer(str(workdir), asynchronous=False)
    for step, values in scalars.items():
        writer.write_scalars(step, values)
    for step, values in (texts or {}).items():
        writer.write_texts(step, values)
    writer.flush()
    writer.close()


def markdown_tables(markdown: str) -> dict[str, list[dict[str, str]]]:
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
