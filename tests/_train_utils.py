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


def tiny_config_dict(**overrides: Any):
    """A one-layer float32 model on 16-byte sequences, as the ConfigDict `config_flags` gives.

    Overrides name top-level fields (`seq_len=32`) or update a section with a dict
    (`optimizer={"learning_rate": 1e-3}`, `model={"num_layers": 2}`).
    """
    from configs import smoke

    config = smoke.get_config()
    config.model.update(
        model_dim=16,
        num_layers=1,
        num_heads=2,
        z_dim=8,
        value_dim=16,
        ffn_hidden_dim=32,
        cema_ndim=2,
        chunk_size=8,
        norm_num_groups=2,
    )
    config.seq_len = 16
    config.batch_size = 8
    config.num_train_steps = 8
    config.log_every_steps = 1
    config.report_every_secs = 3600.0
    config.optimizer.learning_rate = 1e-2
    config.schedule.warmup_steps = 2
    config.eval.update(every_steps=4, num_batches=2, batch_size=8)
    config.checkpoint.update(every_steps=4, async_save=True)
    config.sampling.update(every_steps=4, length=8)
    for key, value in overrides.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


def tiny_config(**overrides: Any):
    """`tiny_config_dict(**overrides)` as the validated `TrainConfig`."""
    from megalodon_flax.training.config import TrainConfig

    return TrainConfig.from_mapping(tiny_config_dict(**overrides))


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
    from megalodon_flax.event_files import event_files as files

    return files(workdir)


def read_scalars(
    workdir: str | Path, tag: str, files: list[Path] | None = None
) -> dict[int, float]:
    """`{step: value}` of a scalar over the event files of `workdir` (last value wins)."""
    from megalodon_flax.event_files import read_scalars as read

    return read(workdir, tag, files)


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
    """`{step: text}` of a text summary."""
    from megalodon_flax.event_files import read_texts as read

    return read(workdir, tag)


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
    """Serializes a `TrainConfig` for a child process (see `config_from_json`)."""
    return json.dumps(config.to_dict())


def config_from_json(text: str):
    """Rebuilds the `TrainConfig` serialized by `config_to_json`."""
    from megalodon_flax.training.config import TrainConfig

    return TrainConfig.from_mapping(json.loads(text))
