"""Tests of the configs, command-line overrides and the rejection of bad input."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import _train_utils as tu
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import megalodon, smoke
from megalodon_flax import sharding, train
from megalodon_flax.config import ConfigError, MegalodonConfig
from megalodon_flax.model import MegalodonLM, parameter_breakdown

CONFIG_FILE = tu.REPO_ROOT / "configs" / "megalodon.py"


# ------------------------------------------------------------------------- default config
def test_default_config_is_the_enwik8_experiment() -> None:
    c = megalodon.get_config()
    assert c.seq_len == 512 and c.model.chunk_size == 256 and c.seq_len // c.model.chunk_size == 2
    assert c.num_train_steps == 1200
    assert c.batch_size * c.grad_accum_steps == 16
    assert (c.learning_rate, c.weight_decay, c.grad_clip_norm) == (4e-4, 2e-4, 1.0)
    assert c.model.compute_dtype == "bfloat16"
    assert c.seed == 7
    assert (c.eval_every_steps, c.num_eval_batches, c.checkpoint_every_steps) == (100, 100, 500)
    assert c.mesh_shape == (-1, 1, 1)
    assert c.logical_axis_rules == sharding.DEFAULT_LOGICAL_AXIS_RULES
    assert c.data_dir is None and c.manual_dir is None
    model_config = train.validate_config(c)
    assert model_config == MegalodonConfig.from_mapping(c.model.to_dict())
    assert parameter_breakdown(model_config)["total"] == 11_277_696
    # Independent count: the leaves of an abstract initialization.
    params = jax.eval_shape(
        lambda: MegalodonLM(model_config).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    )["params"]
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(params))) == 11_277_696


def test_model_fields_map_one_to_one_onto_megalodon_config() -> None:
    import dataclasses

    fields = {f.name for f in dataclasses.fields(MegalodonConfig)}
    assert set(megalodon.get_config().model.keys()) == fields


def _assigned_fields(tree: ast.Module) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            target = node.targets[0]
            if isinstance(target.value, ast.Name) and target.value.id in ("config", "model"):
                out.append((node.lineno, f"{target.value.id}.{target.attr}"))
    return out


def test_every_field_has_a_one_line_comment() -> None:
    source = CONFIG_FILE.read_text()
    lines = source.splitlines()
    assigned = _assigned_fields(ast.parse(source))
    c = megalodon.get_config()
    names = {name.split(".", 1)[1] for _, name in assigned}
    assert names == set(c.keys()) | set(c.model.keys())
    for lineno, name in assigned:
        above = lines[lineno - 2].strip()
        assert above.startswith("# ") and len(above) > 4, f"{name} (line {lineno}) lacks a comment"


def test_smoke_config_is_small_and_valid() -> None:
    c = smoke.get_config()
    model_config = train.validate_config(c)
    assert parameter_breakdown(model_config)["total"] < 100_000
    assert model_config.compute_dtype == "float32"
    assert c.num_train_steps <= 100


# ----------------------------------------------------------------------- command line
def _parse(*args: str) -> ml_collections.ConfigDict:
    """Parses a command line the way main.py does (config_flags reads sys.argv)."""
    argv = ["main.py", f"--config={CONFIG_FILE}", *args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True)
    saved = sys.argv
    sys.argv = argv
    try:
        fv(argv)
    finally:
        sys.argv = saved
    return fv.config


def test_command_line_overrides() -> None:
    c = _parse(
        "--config.seed=3",
        "--config.model.num_layers=4",
        "--config.mesh_shape=(2,1,-1)",
        "--config.lr_schedule=constant",
        "--config.data_dir=/data/tfds",
        "--config.model.compute_dtype=float32",
    )
    assert c.seed == 3 and c.model.num_layers == 4
    assert tuple(c.mesh_shape) == (2, 1, -1)
    assert c.lr_schedule == "constant" and c.data_dir == "/data/tfds"
    assert train.validate_config(c).num_layers == 4


@pytest.mark.parametrize(
    ("arg", "name"),
    [
        ("--config.not_a_field=1", "not_a_field"),
        ("--config.model.not_a_field=1", "not_a_field"),
        ("--config.seed=abc", "--config.seed=abc"),
        ("--config.model.swiglu=maybe", "--config.model.swiglu=maybe"),
        ("--config.learning_rate=fast", "--config.learning_rate=fast"),
    ],
)
def test_command_line_rejects_unknown_keys_and_wrong_types(arg: str, name: str) -> None:
    with pytest.raises((flags.Error, AttributeError)) as info:
        _parse(arg)
    assert name in str(info.value)


# --------------------------------------------------------------------------- bad input
@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if training gets as far as loading data."""

    def forbidden(*args, **kwargs):
        raise AssertionError("work started despite bad input")

    monkeypatch.setattr(train, "load_data", forbidden)


def _expect_stop(config, workdir: Path, exc, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        train.train_and_evaluate(config, str(workdir))
    assert not workdir.exists() or workdir.is_file()


def test_unknown_keys_stop(tmp_path: Path, no_work) -> None:
    c = tu.tiny_config()
    with c.unlocked():
        c.learning_rat = 1e-3
    _expect_stop(c, tmp_path / "w", ConfigError, r"unknown config keys: \['learning_rat'\]")
    c = tu.tiny_config()
    c.model.unlock()
    c.model.num_layer = 3
    _expect_stop(c, tmp_path / "w", ConfigError, r"config.model: .*\['num_layer'\]")


def test_wrong_types_stop(tmp_path: Path, no_work) -> None:
    with pytest.raises(TypeError):  # a typed ConfigDict refuses at assignment
        tu.tiny_config().seq_len = "512"
    for key, value, pattern in [
        ("seq_len", "512", r"config.seq_len has the wrong type"),
        ("learning_rate", "fast", r"config.learning_rate has the wrong type"),
        ("async_checkpointing", 1, r"config.async_checkpointing has the wrong type"),
        ("mesh_shape", (1.5, 1, 1), r"config.mesh_shape has the wrong type"),
    ]:
        d = tu.tiny_config().to_dict()
        d[key] = value
        _expect_stop(ml_collections.ConfigDict(d), tmp_path / "w", ConfigError, pattern)
    d = tu.tiny_config().to_dict()
    d["model"]["num_layers"] = "6"
    _expect_stop(ml_collections.ConfigDict(d), tmp_path / "w", ConfigError, "num_layers")


def test_seq_len_below_two_stops(tmp_path: Path, no_work) -> None:
    for n in (1, 0, -4):
        _expect_stop(
            tu.tiny_config(seq_len=n), tmp_path / "w", ConfigError, r"config.seq_len must be >= 2"
        )


def test_float16_stops(tmp_path: Path, no_work) -> None:
    for field in ("compute_dtype", "param_dtype"):
        c = tu.tiny_config(**{f"model.{field}": "float16"})
        _expect_stop(c, tmp_path / "w", ConfigError, rf"{field}=float16 is not supported")


def test_mesh_larger_than_device_count_stops(tmp_path: Path, no_work) -> None:
    n = jax.device_count()
    c = tu.tiny_config(mesh_shape=(n + 1, 1, 1))
    _expect_stop(c, tmp_path / "w", ConfigError, rf"mesh_shape: .*needs {n + 1} devices")
    c = tu.tiny_config(mesh_shape=(1, 1))
    _expect_stop(c, tmp_path / "w", ConfigError, r"mesh_shape must give 3 sizes")


def test_workdir_that_is_a_file_stops(tmp_path: Path, no_work) -> None:
    path = tmp_path / "a_file"
    path.write_text("keep me")
    _expect_stop(tu.tiny_config(), path, ValueError, r"a_file exists and is not a directory")
    _expect_stop(tu.tiny_config(), path / "sub", ValueError, r"a_file is a file")
    assert path.read_text() == "keep me"


def test_other_invalid_values_stop(tmp_path: Path, no_work) -> None:
    for key, value, pattern in [
        ("batch_size", 0, "config.batch_size must be >= 1"),
        ("grad_accum_steps", 0, "config.grad_accum_steps must be >= 1"),
        ("lr_schedule", "exp", "config.lr_schedule must be one of"),
        ("eval_split", "train", "config.eval_split"),
        ("logical_axis_rules", (("mlp", "model"),), "config.logical_axis_rules"),
        ("model.vocab_size", 128, "must be >= 256 for byte-level"),
    ]:
        _expect_stop(tu.tiny_config(**{key: value}), tmp_path / "w", ConfigError, pattern)


_DEVICES_CHILD = """
import json
import _train_utils as tu
from megalodon_flax import train

cases = [
    dict(mesh_shape=(8, 1, 1), batch_size=12),
    dict(mesh_shape=(8, 1, 1), eval_batch_size=4),
    dict(mesh_shape=(2, 4, 1), batch_size=12),
    dict(mesh_shape=(16, 1, 1)),
    dict(mesh_shape=(3, -1, 1)),
]
out = []
for case in cases:
    try:
        train.train_and_evaluate(tu.tiny_config(**case), {workdir!r})
        out.append("no error")
    except Exception as err:
        out.append(type(err).__name__ + ": " + str(err))
print("RESULT" + json.dumps(out))
"""


def test_batch_not_divisible_by_data_axis_stops_on_eight_devices(tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    proc = tu.run_python(_DEVICES_CHILD.format(workdir=str(workdir)), num_devices=8)
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out[0].startswith("ConfigError: config.batch_size=12 is not divisible by the 8")
    assert out[1].startswith("ConfigError: config.eval_batch_size=4 is not divisible by the 8")
    assert out[2].startswith("ConfigError: config.batch_size=12 is not divisible by the 8")
    assert "needs 16 devices but only 8" in out[3]
    assert "not divisible by the fixed axis sizes" in out[4]
    assert not workdir.exists()


@pytest.mark.parametrize(
    ("arg", "expect"),
    [
        ("--config.not_a_field=1", "not_a_field"),
        ("--config.seq_len=1", "config.seq_len must be >= 2"),
    ],
)
def test_main_exits_with_a_message_naming_the_problem(tmp_path: Path, arg, expect) -> None:
    workdir = tmp_path / "w"
    proc = subprocess.run(
        [
            sys.executable,
            str(tu.REPO_ROOT / "main.py"),
            f"--config={tu.REPO_ROOT / 'configs' / 'smoke.py'}",
            f"--workdir={workdir}",
            arg,
        ],
        cwd=tu.REPO_ROOT,
        env=tu.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert expect in proc.stderr
    assert not workdir.exists()
