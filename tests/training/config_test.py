"""Tests of the training configuration (megalodon_flax.training.config and configs/): the
config files, command-line overrides and the rejection of bad input before any work.

Oracles: the enwik8 experiment's numbers (spec §7.2) and an abstract initialization for its
parameter count, the dataclass fields and their source comments, and the expected error
messages; `no_work` fails a test if training got as far as building a model or loading data.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import llama, megalodon, smoke
from megalodon_flax import sharding
from megalodon_flax.config_base import ConfigError
from megalodon_flax.data import enwik8
from megalodon_flax.llama import LlamaConfig
from megalodon_flax.megalodon import MegalodonLM, parameter_breakdown
from megalodon_flax.megalodon.config import MegalodonConfig
from megalodon_flax.training import config as train_config
from megalodon_flax.training import loop
from megalodon_flax.training.config import TrainConfig
from tests import helpers
from tests.factories import tiny_llama_train_mapping, tiny_train_config, tiny_train_config_dict

CONFIG_FILE = helpers.REPO_ROOT / "configs" / "megalodon.py"


# ------------------------------------------------------------------------- default config
def test_default_config_is_the_enwik8_experiment() -> None:
    c = megalodon.get_config()
    assert c.seq_len == 512 and c.model.chunk_size == 256 and c.seq_len // c.model.chunk_size == 2
    assert c.num_train_steps == 1200
    assert c.batch_size * c.grad_accum_steps == 16
    opt = c.optimizer
    assert (opt.learning_rate, opt.weight_decay, opt.grad_clip_norm) == (4e-4, 2e-4, 1.0)
    assert (c.schedule.kind, c.schedule.warmup_steps) == ("cosine", 100)
    assert c.model.compute_dtype == "bfloat16"
    assert c.seed == 7
    assert (c.eval.every_steps, c.eval.num_batches, c.checkpoint.every_steps) == (100, 100, 500)
    assert tuple(c.mesh.shape) == (-1, 1, 1, 1)
    assert c.mesh.logical_axis_rules == sharding.DEFAULT_LOGICAL_AXIS_RULES
    assert c.data.data_dir is None and c.data.manual_dir is None
    config = TrainConfig.from_mapping(c)
    assert config == TrainConfig()  # the typed default is the same experiment
    assert config.effective_batch_size == 16
    assert config.model == MegalodonConfig.from_mapping(c.model.to_dict())
    assert parameter_breakdown(config.model)["total"] == 11_277_696
    # Independent count: the leaves of an abstract initialization.
    params = jax.eval_shape(
        lambda: MegalodonLM(config.model).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    )["params"]
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(params))) == 11_277_696


def test_model_fields_map_one_to_one_onto_megalodon_config() -> None:
    fields = {f.name for f in dataclasses.fields(MegalodonConfig)}
    assert set(megalodon.get_config().model.keys()) == fields
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    assert set(llama.get_config().model.keys()) == fields


# The classes whose fields a config file or `--config.<name>=` sets, and their paths.
SECTIONS = {
    "config": train_config.TrainConfig,
    "config.optimizer": train_config.OptimizerConfig,
    "config.schedule": train_config.ScheduleConfig,
    "config.eval": train_config.EvalConfig,
    "config.sampling": train_config.SamplingConfig,
    "config.checkpoint": train_config.CheckpointConfig,
    "config.mesh": train_config.MeshConfig,
    "config.data": train_config.DataConfig,
    "config.profile": train_config.ProfileConfig,
    "config.model (megalodon)": MegalodonConfig,
    "config.model (llama)": LlamaConfig,
}


def _section_names(cls: type) -> set[str]:
    """Fields of `cls` holding a nested section (documented by its class docstring)."""
    out = set()
    for f in dataclasses.fields(cls):
        default = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if isinstance(default, type) and issubclass(default, train_config.Section):
            assert default.__doc__, f"{default.__name__} lacks a docstring"
            out.add(f.name)
    return out


def _leaf_keys(config: ml_collections.ConfigDict, prefix: str = "config") -> set[str]:
    out = set()
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out |= _leaf_keys(value, f"{prefix}.{key}")
        else:
            out.add(f"{prefix}.{key}")
    return out


def test_the_documented_classes_cover_every_config_key() -> None:
    covered = set()
    for path, cls in SECTIONS.items():
        path = path.split(" ")[0]
        skip = _section_names(cls) | {"model"}
        covered |= {f"{path}.{f.name}" for f in dataclasses.fields(cls) if f.name not in skip}
    for module in (megalodon, smoke, llama):
        assert _leaf_keys(module.get_config()) <= covered, module.__name__


def _undocumented_fields(cls: type) -> list[str]:
    """Fields of a config dataclass with neither a `# ` comment on the line above nor an
    entry (`name: ...`) in the class docstring; a nested section counts as documented by its
    class docstring."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.ClassDef)
    docstring = ast.get_docstring(node) or ""
    in_docstring = set(re.findall(r"^\s*(\w+):", docstring, re.MULTILINE))
    sections = _section_names(cls)
    missing = []
    for item in node.body:
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        name = item.target.id
        if "ClassVar" in ast.unparse(item.annotation) or name in sections:
            continue
        above = lines[item.lineno - 2].strip()
        if not (above.startswith("# ") and len(above) > 4) and name not in in_docstring:
            missing.append(name)
    return missing


@pytest.mark.parametrize("path", list(SECTIONS))
def test_every_field_has_a_one_line_comment(path: str) -> None:
    """Every field a config file can set is described where it is defined."""
    missing = _undocumented_fields(SECTIONS[path])
    assert not missing, f"{path}: fields without a comment: {missing}"


def test_smoke_config_is_small_and_valid() -> None:
    c = smoke.get_config()
    config = TrainConfig.from_mapping(c)
    assert parameter_breakdown(config.model)["total"] < 100_000
    assert config.model.compute_dtype == "float32"
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
        "--config.mesh.shape=(2,1,-1,1)",
        "--config.schedule.kind=constant",
        "--config.optimizer.learning_rate=1e-3",
        "--config.eval.batch_size=32",
        "--config.data.data_dir=/data/tfds",
        "--config.model.compute_dtype=float32",
    )
    assert c.seed == 3 and c.model.num_layers == 4
    assert tuple(c.mesh.shape) == (2, 1, -1, 1)
    assert c.schedule.kind == "constant" and c.data.data_dir == "/data/tfds"
    config = TrainConfig.from_mapping(c)
    assert config.model.num_layers == 4 and config.model.compute_dtype == "float32"
    assert config.mesh.shape == (2, 1, -1, 1)
    assert (config.schedule.kind, config.optimizer.learning_rate) == ("constant", 1e-3)
    assert (config.eval.batch_size, config.data.data_dir) == (32, "/data/tfds")
    assert config.data.manual_dir is None  # an untouched placeholder stays None


@pytest.mark.parametrize(
    ("arg", "name"),
    [
        ("--config.not_a_field=1", "not_a_field"),
        ("--config.model.not_a_field=1", "not_a_field"),
        ("--config.optimizer.not_a_field=1", "not_a_field"),
        ("--config.learning_rate=1e-3", "learning_rate"),  # the flat name before nesting
        ("--config.seed=abc", "--config.seed=abc"),
        ("--config.model.swiglu=maybe", "--config.model.swiglu=maybe"),
        ("--config.optimizer.learning_rate=fast", "--config.optimizer.learning_rate=fast"),
    ],
)
def test_command_line_rejects_unknown_keys_and_wrong_types(arg: str, name: str) -> None:
    with pytest.raises((flags.Error, AttributeError)) as info:
        _parse(arg)
    assert name in str(info.value)


# --------------------------------------------------------------------------- bad input
@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if training gets as far as building the model or loading data."""

    def forbidden(*args, **kwargs):
        raise AssertionError("work started despite bad input")

    monkeypatch.setattr(enwik8, "load_enwik8_splits", forbidden)
    monkeypatch.setattr(loop, "setup_training", forbidden)


def _expect_invalid(config: ml_collections.ConfigDict | dict, pattern: str) -> None:
    """The config does not validate: a ConfigError matching `pattern`, before any work."""
    with pytest.raises(ConfigError, match=pattern):
        TrainConfig.from_mapping(config)


def _expect_stop(config: TrainConfig, workdir: Path, exc, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        loop.train_and_evaluate(config, str(workdir))
    assert not workdir.exists() or workdir.is_file()


def _with(key: str, value) -> ml_collections.ConfigDict:
    """The tiny config with the dotted `key` (`optimizer.learning_rate`) set to any value."""
    d = tiny_train_config_dict().to_dict()
    *sections, name = key.split(".")
    target = d
    for section in sections:
        target = target[section]
    target[name] = value
    return ml_collections.ConfigDict(d)


def test_unknown_keys_stop() -> None:
    c = tiny_train_config_dict()
    with c.unlocked():
        c.learning_rat = 1e-3
    _expect_invalid(c, r"unknown config keys: \['config.learning_rat'\]")
    c = tiny_train_config_dict()
    with c.optimizer.unlocked():
        c.optimizer.learning_rat = 1e-3
    _expect_invalid(c, r"unknown config keys: \['config.optimizer.learning_rat'\]")
    c = tiny_train_config_dict()
    with c.model.unlocked():
        c.model.num_layer = 3
    _expect_invalid(c, r"config.model: .*\['num_layer'\]")


def test_flat_key_from_before_nesting_in_a_nested_config_stops() -> None:
    """`config.learning_rate = ...` added to a nested config (an old config file ported
    halfway) is refused, not silently dropped in favour of `config.optimizer.learning_rate`."""
    c = tiny_train_config_dict()
    with c.unlocked():
        c.learning_rate = 0.5
    _expect_invalid(c, r"unknown config keys: \['config.learning_rate'\]")


def test_flat_config_json_from_before_nesting_is_read() -> None:
    """A flat (pre-nesting) config, as old `config.json` files hold, maps key by key."""
    model = tiny_train_config_dict().model.to_dict()
    flat = {
        "seq_len": 16,
        "learning_rate": 3e-3,
        "lr_schedule": "linear",
        "eval_batch_size": 32,
        "mesh_shape": [1, -1, 1],
        "async_checkpointing": False,
        "sample_top_k": 5,
        "profile_num_steps": 0,
        "model": model,
    }
    nested = {
        "seq_len": 16,
        "optimizer": {"learning_rate": 3e-3},
        "schedule": {"kind": "linear"},
        "eval": {"batch_size": 32},
        "mesh": {"shape": (1, -1, 1)},
        "checkpoint": {"async_save": False},
        "sampling": {"top_k": 5},
        "profile": {"num_steps": 0},
        "model": model,
    }
    config = TrainConfig.from_mapping(json.loads(json.dumps(flat)))
    assert config == TrainConfig.from_mapping(nested)
    assert (config.optimizer.learning_rate, config.schedule.kind) == (3e-3, "linear")
    assert config.mesh.shape == (1, -1, 1, 1) and config.sampling.top_k == 5


def test_wrong_types_stop() -> None:
    with pytest.raises(TypeError):  # a typed ConfigDict refuses at assignment
        tiny_train_config_dict().seq_len = "512"
    for key, value, pattern in [
        ("seq_len", "512", r"config.seq_len has the wrong type"),
        ("optimizer.learning_rate", "fast", r"config.optimizer.learning_rate has the wrong type"),
        ("checkpoint.async_save", 1, r"config.checkpoint.async_save has the wrong type"),
        ("mesh.shape", (1.5, 1, 1), r"config.mesh.shape has the wrong type"),
        ("model.num_layers", "6", r"config.model: num_layers"),
    ]:
        _expect_invalid(_with(key, value), pattern)


def test_seq_len_below_two_stops() -> None:
    for n in (1, 0, -4):
        _expect_invalid(tiny_train_config_dict(seq_len=n), r"config.seq_len must be >= 2")


def test_float16_stops() -> None:
    for field in ("compute_dtype", "param_dtype"):
        c = tiny_train_config_dict(model={field: "float16"})
        _expect_invalid(c, rf"config.model: {field}=float16 is not supported")


def test_mesh_larger_than_device_count_stops(tmp_path: Path, no_work) -> None:
    n = jax.device_count()
    c = tiny_train_config(mesh={"shape": (n + 1, 1, 1)})
    _expect_stop(c, tmp_path / "w", ConfigError, rf"config.mesh.shape .*needs {n + 1} devices")
    _expect_invalid(tiny_train_config_dict(mesh={"shape": (1, 1)}), r"mesh.shape must give 4 sizes")


def test_workdir_that_is_a_file_stops(tmp_path: Path, no_work) -> None:
    path = tmp_path / "a_file"
    path.write_text("keep me")
    _expect_stop(tiny_train_config(), path, ValueError, r"a_file exists and is not a directory")
    _expect_stop(tiny_train_config(), path / "sub", ValueError, r"a_file is a file")
    assert path.read_text() == "keep me"


def test_other_invalid_values_stop() -> None:
    for key, value, pattern in [
        ("batch_size", 0, "config.batch_size must be >= 1"),
        ("grad_accum_steps", 0, "config.grad_accum_steps must be >= 1"),
        ("optimizer.learning_rate", 0.0, "config.optimizer.learning_rate must be > 0"),
        ("optimizer.learning_rate", float("nan"), "config.optimizer.learning_rate must be > 0"),
        ("schedule.kind", "exp", "config.schedule.kind must be one of"),
        ("eval.split", "train", "config.eval.split"),
        ("eval.mode", "both_ways", "config.eval.mode must be one of"),
        ("sampling.top_p", 0.0, r"config.sampling.top_p must be in \(0, 1\]"),
        ("mesh.logical_axis_rules", (("mlp", "model"),), "config.mesh.logical_axis_rules"),
        ("model_family", "gpt", "config.model_family must be one of"),
        ("model.vocab_size", 128, "must be >= 256 for byte-level"),
    ]:
        _expect_invalid(_with(key, value), pattern)


def test_data_source_fields_must_agree() -> None:
    _expect_invalid(
        _with("data.source", "text_files"), r"source='text_files' needs config.data.text_paths"
    )
    c = _with("data.source", "text_files")
    c.data.text_paths = "corpus/"
    c.data.documents = "pages"
    _expect_invalid(c, r"documents='pages' applies to enwik8 only")
    _expect_invalid(_with("data.source", "web"), r"config.data.source")
    TrainConfig.from_mapping(_with("data.documents", "pages"))  # enwik8 pages: valid


def test_text_files_take_every_evaluation_mode_with_a_state_carrying_model() -> None:
    for mode in ("window", "stream", "both"):
        c = _with("data.source", "text_files")
        c.data.text_paths = "corpus/"
        c.eval.mode = mode
        assert TrainConfig.from_mapping(c).eval.mode == mode
    d = tiny_llama_train_mapping(eval={"mode": "stream"})  # a bounded context: no stream
    d["data"].update(source="text_files", text_paths="corpus/")
    _expect_invalid(d, r"eval.mode='stream' needs a model with carried state")
