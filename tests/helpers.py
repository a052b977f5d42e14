"""Helpers shared by the tests: paths, a small enwik8, event readers, child processes.

The tiny configs live in `tests/factories.py`, the independent oracles in `tests/reference/`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from megalodon_flax.event_files import event_files as event_files
from megalodon_flax.event_files import read_scalars as read_scalars
from megalodon_flax.event_files import read_texts as read_texts

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTDATA = REPO_ROOT / "tests" / "testdata"

SAMPLE_ZIP = REPO_ROOT / "megalodon_flax" / "data" / "sample" / "enwik8.zip"
# A persistent XLA cache for the child processes of the tests: the same programs are compiled
# by several of them (reference, killed and resumed runs), which otherwise dominates.
JAX_CACHE_DIR = Path(tempfile.gettempdir()) / "megalodon_flax_test_jax_cache"
CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": str(JAX_CACHE_DIR),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
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
    imports `tests.factories` and `tests.helpers`), fake CPU devices, the compilation cache."""
    env = dict(os.environ)
    paths = (str(REPO_ROOT), env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if num_devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env.update(CACHE_ENV)
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
