"""Helpers shared by the training-system tests: tiny configs, a small enwik8, event readers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

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


def tiny_config(**overrides: Any):
    """A one-layer float32 model on 16-byte sequences; fields may be overridden by name."""
    from configs import smoke

    config = smoke.get_config()
    model = config.model
    model.model_dim = 16
    model.num_layers = 1
    model.num_heads = 2
    model.z_dim = 8
    model.value_dim = 16
    model.ffn_hidden_dim = 32
    model.cema_ndim = 2
    model.chunk_size = 8
    model.norm_num_groups = 2
    config.seq_len = 16
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_train_steps = 8
    config.learning_rate = 1e-2
    config.warmup_steps = 2
    config.log_every_steps = 1
    config.eval_every_steps = 4
    config.num_eval_batches = 2
    config.checkpoint_every_steps = 4
    config.sample_every_steps = 4
    config.sample_length = 8
    config.report_every_secs = 3600.0
    config.async_checkpointing = True
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


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


def event_files(workdir: str | Path) -> list[Path]:
    """TensorBoard event files of `workdir`, oldest first (one per run)."""
    files = Path(workdir).glob("events.out.tfevents.*")
    return sorted(files, key=lambda p: float(p.name.split(".")[3]))


def read_scalars(
    workdir: str | Path, tag: str, files: list[Path] | None = None
) -> dict[int, float]:
    """Returns `{step: value}` of a scalar written by clu's SummaryWriter (last value wins).

    Reads every event file of `workdir`, or only `files` when given.
    """
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    out: dict[int, float] = {}
    for path in event_files(workdir) if files is None else files:
        acc = event_accumulator.EventAccumulator(
            str(path), size_guidance={event_accumulator.TENSORS: 0}
        )
        acc.Reload()
        if tag in acc.Tags()["tensors"]:
            for event in acc.Tensors(tag):
                out[event.step] = float(tensor_util.make_ndarray(event.tensor_proto))
    return out


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


def read_texts(workdir: str | Path, tag: str = "sample") -> dict[int, str]:
    """Returns `{step: text}` of a text summary."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    out: dict[int, str] = {}
    for path in event_files(workdir):
        acc = event_accumulator.EventAccumulator(
            str(path), size_guidance={event_accumulator.TENSORS: 0}
        )
        acc.Reload()
        if tag in acc.Tags()["tensors"]:
            for event in acc.Tensors(tag):
                value = tensor_util.make_ndarray(event.tensor_proto)
                out[event.step] = np.asarray(value).reshape(-1)[0].decode("utf-8")
    return out


def subprocess_env(num_devices: int | None = None, **extra: str) -> dict[str, str]:
    """Environment for a child Python process: repo on the path, fake CPU devices, cache."""
    env = dict(os.environ)
    paths = (str(REPO_ROOT), str(REPO_ROOT / "tests"), env.get("PYTHONPATH", ""))
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


def config_to_json(config) -> str:
    """Serializes a config for a child process (see `config_from_json`)."""
    return config.to_json()


def config_from_json(text: str):
    """Rebuilds a config serialized by `config_to_json`, restoring tuples."""
    import ml_collections

    def fix(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if isinstance(value, list):
            return tuple(fix(v) for v in value)
        return value

    return ml_collections.ConfigDict(fix(json.loads(text)))
