"""The training configuration: frozen, validated dataclasses nested by concern.

`TrainConfig()` is the enwik8 experiment; every default lives here once. Config files
(`configs/*.py`) start from `default_config()`, the same values as an `ml_collections`
ConfigDict that `config_flags` can override (`--config.optimizer.learning_rate=1e-3`), and
change only what differs. `TrainConfig.from_mapping` turns what `config_flags` parsed (or a
saved `config.json`) back into the typed config: an unknown key, a wrong type or an invalid
value fails with a `ConfigError` naming the field, e.g. `config.optimizer.learning_rate`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Self

import ml_collections
from ml_collections import config_dict

from megalodon_flax import families, sharding
from megalodon_flax.config_base import ConfigError

LR_SCHEDULES = ("cosine", "linear", "rsqrt", "constant")
Check = tuple[Callable[[Any], bool], str]


def _ge(low: float) -> Check:
    return (lambda v: v >= low), f">= {low}"


def _one_of(*allowed: Any) -> Check:
    return (lambda v: v in allowed), f"one of {allowed}"


def _field(default: Any, check: Check | None = None) -> Any:
    """A dataclass field whose value must pass `check` (a predicate and its rule in words)."""
    return dataclasses.field(default=default, metadata={"check": check})


class Section:
    """Validation shared by the config sections: each field's type and check.

    Subclasses are frozen dataclasses; `PREFIX` is their path in messages (`config.eval`).
    """

    PREFIX: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            if dataclasses.is_dataclass(getattr(self, f.name)):
                continue  # a nested section or the model config: validated on its own
            value = _coerce(f"{self.PREFIX}.{f.name}", getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
            check = f.metadata.get("check")
            if check is not None and not check[0](value):
                raise ConfigError(f"{self.PREFIX}.{f.name} must be {check[1]}, got {value!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Self:
        """Builds the section from a mapping; unknown keys fail with their full names."""
        values = _plain(values)
        if not isinstance(values, Mapping):
            raise ConfigError(f"{cls.PREFIX} must be a mapping, got {values!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"unknown config keys: {[f'{cls.PREFIX}.{k}' for k in unknown]}")
        hints = _type_hints(cls)
        kwargs = {}
        for name, value in values.items():
            kind = hints[name]
            if isinstance(kind, type) and issubclass(kind, Section):
                value = kind.from_mapping(value)
            kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain values (JSON-serializable)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
        return out


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _plain(values: Any) -> Any:
    return values.to_dict() if isinstance(values, ml_collections.ConfigDict) else values


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """`value` as the annotated type (ints for floats, lists for tuples), else ConfigError."""
    wrong = ConfigError(
        f"{name} has the wrong type: expected {_type_name(kind)}, got "
        f"{type(value).__name__} {value!r}"
    )
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if value is None:
        if type(None) in options:
            return None
        raise wrong
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if option is tuple and isinstance(value, list | tuple):
            return _tuples(value)
        if typing.get_origin(option) is tuple and isinstance(value, list | tuple):
            if typing.get_args(option) == (int, Ellipsis):
                if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                    return tuple(value)
                raise wrong
            return _tuples(value)
    raise wrong


def _tuples(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    return value


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind))


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(Section):
    """AdamW with decoupled weight decay after global-norm clipping."""

    PREFIX: ClassVar[str] = "config.optimizer"
    # Peak learning rate.
    learning_rate: float = _field(4e-4, ((lambda v: v > 0 and math.isfinite(v)), "> 0"))
    # AdamW beta1.
    adam_b1: float = _field(0.9, ((lambda v: 0 <= v < 1), "in [0, 1)"))
    # AdamW beta2.
    adam_b2: float = _field(0.98, ((lambda v: 0 <= v < 1), "in [0, 1)"))
    # AdamW epsilon.
    adam_eps: float = _field(1e-8, _ge(0))
    # Decoupled weight decay.
    weight_decay: float = _field(2e-4, _ge(0))
    # Parameters that decay: 'all' or 'matrices' (ndim >= 2: skips norms, biases, CEMA vectors).
    weight_decay_mask: str = _field("all", _one_of("all", "matrices"))
    # Clip gradients to this global norm (0: no clipping).
    grad_clip_norm: float = _field(1.0, _ge(0))


@dataclasses.dataclass(frozen=True)
class ScheduleConfig(Section):
    """Linear warmup, then a decay shape."""

    PREFIX: ClassVar[str] = "config.schedule"
    # Shape after warmup: 'cosine', 'linear', 'rsqrt' or 'constant'.
    kind: str = _field("cosine", _one_of(*LR_SCHEDULES))
    # Linear warmup from 0 over this many steps (0: none).
    warmup_steps: int = _field(100, _ge(0))
    # Final learning rate of the cosine / linear decay as a fraction of the peak.
    min_lr_ratio: float = _field(0.1, ((lambda v: 0 <= v <= 1), "in [0, 1]"))


@dataclasses.dataclass(frozen=True)
class EvalConfig(Section):
    """Periodic evaluation during training."""

    PREFIX: ClassVar[str] = "config.eval"
    # Evaluate every this many steps (and after the last step).
    every_steps: int = _field(100, _ge(1))
    # Batches per window evaluation (-1: the whole split).
    num_batches: int = _field(100, ((lambda v: v == -1 or v >= 1), "-1 or >= 1"))
    # Global batch of window evaluation.
    batch_size: int = _field(16, _ge(1))
    # Split evaluated: 'validation' or 'test'.
    split: str = _field("validation", _one_of("validation", "test"))
    # 'window' (fresh state per seq_len window), 'stream' (state carried over the split, or
    # over each held-out text_files document from a fresh state; constant memory) or 'both'.
    mode: str = _field("window", _one_of("window", "stream", "both"))
    # Stream evaluation: the first tokens (bytes without a tokenizer) of the split or of the
    # held-out documents, the document it cuts read up to the cut (-1: all of them).
    stream_max_bytes: int = _field(262_144, ((lambda v: v == -1 or v >= 2), "-1 or >= 2"))
    # Stream evaluation: contiguous streams (text_files: documents) read in parallel.
    stream_num_streams: int = _field(1, _ge(1))


@dataclasses.dataclass(frozen=True)
class SamplingConfig(Section):
    """Text samples written to TensorBoard during training."""

    PREFIX: ClassVar[str] = "config.sampling"
    # Generate a sample every this many steps (0: never).
    every_steps: int = _field(200, _ge(0))
    # Prompt (UTF-8 bytes).
    prompt: str = _field("<page>\n    <title>", ((lambda v: len(v) > 0), "non-empty"))
    # Bytes generated per sample.
    length: int = _field(256, _ge(1))
    # Temperature (0: greedy).
    temperature: float = _field(1.0, _ge(0))
    # Top-k filter (0: off).
    top_k: int = _field(0, _ge(0))
    # Nucleus (top-p) filter (1.0: off).
    top_p: float = _field(0.95, ((lambda v: 0 < v <= 1), "in (0, 1]"))


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(Section):
    """Orbax checkpoints of the train state and the data position."""

    PREFIX: ClassVar[str] = "config.checkpoint"
    # Save every this many steps (and after the last step).
    every_steps: int = _field(500, _ge(1))
    # Checkpoints kept on disk.
    max_to_keep: int = _field(3, _ge(1))
    # Write checkpoints in the background.
    async_save: bool = _field(True)


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
    """The device mesh and the logical axis rules (see `megalodon_flax/sharding.py`)."""

    PREFIX: ClassVar[str] = "config.mesh"
    # Sizes along (data, fsdp, tensor, context); one -1 absorbs the remaining devices. A
    # context size P > 1 splits every sequence into P shards along time.
    shape: tuple[int, ...] = _field((-1, 1, 1, 1))
    # Logical axis name -> mesh axes.
    logical_axis_rules: tuple = _field(sharding.DEFAULT_LOGICAL_AXIS_RULES)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.shape) == len(sharding.MESH_AXES) - 1:
            # Written before the context axis existed (a saved config.json): context size 1.
            object.__setattr__(self, "shape", (*self.shape, 1))
        if len(self.shape) != len(sharding.MESH_AXES):
            raise ConfigError(
                f"config.mesh.shape must give {len(sharding.MESH_AXES)} sizes for the axes "
                f"{sharding.MESH_AXES}, got {self.shape}"
            )
        try:
            rules = sharding.validate_rules(self.logical_axis_rules)
        except sharding.MeshError as err:
            raise ConfigError(f"config.mesh.logical_axis_rules: {err}") from None
        object.__setattr__(self, "logical_axis_rules", rules)


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    """Where the training text comes from and how it becomes batches."""

    PREFIX: ClassVar[str] = "config.data"
    # 'enwik8' (the tfds builder) or 'text_files' (a folder, files or globs: `text_paths`).
    source: str = _field("enwik8", _one_of("enwik8", "text_files"))
    # enwik8 only: 'windows' (random seq_len + 1 byte windows, the published protocol) or
    # 'pages' (its <page> elements as documents, packed into rows with segment ids).
    documents: str = _field("windows", _one_of("windows", "pages"))
    # text_files: comma-separated directories, files and globs (.jsonl: one document per line).
    text_paths: str | None = _field(None)
    # text_files: the JSONL field holding each document's text.
    text_field: str = _field("text", ((lambda v: len(v) > 0), "non-empty"))
    # text_files: fraction of the documents (the last ones) held out for evaluation.
    eval_fraction: float = _field(0.01, ((lambda v: 0 < v < 1), "in (0, 1)"))
    # Packed documents: a tokenizer file (Hugging Face tokenizers .json, else sentencepiece
    # .model); None: bytes (vocabulary 256).
    tokenizer: str | None = _field(None)
    # With a tokenizer: 'replace' invalid UTF-8 by U+FFFD, or stop with an 'error'.
    invalid_utf8: str = _field("replace", _one_of("replace", "error"))
    # Batches prepared ahead by a background thread, windows and packed rows alike (0: none).
    prefetch: int = _field(2, _ge(0))
    # tfds data directory (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    data_dir: str | None = _field(None)
    # Directory holding the full enwik8.zip (None: <data_dir>/downloads/manual).
    manual_dir: str | None = _field(None)
    # Use the bundled 4 MB sample (with a loud warning) when the full file is unavailable.
    allow_sample_fallback: bool = _field(True)


@dataclasses.dataclass(frozen=True)
class ProfileConfig(Section):
    """A TensorBoard profile trace of a few steps."""

    PREFIX: ClassVar[str] = "config.profile"
    # Steps traced (0: never).
    num_steps: int = _field(5, _ge(0))
    # Step at which the trace starts.
    first_step: int = _field(10, _ge(0))


def _default_model() -> families.ModelConfig:
    from megalodon_flax.megalodon.config import enwik8_config

    # Scanned blocks rematted by save_dots_no_batch: the unrolled step's speed with 0.45× its
    # buffers and faster compilation (benchmarks/RESULTS.md, "Execution options").
    return enwik8_config(
        compute_dtype="bfloat16", scan_layers=True, remat_policy="save_dots_no_batch"
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    """The whole training run; the defaults are the enwik8 experiment (11,277,696 parameters,
    1,200 steps of 16 × 512 bytes, bf16 compute)."""

    PREFIX: ClassVar[str] = "config"
    # Model family: 'megalodon' or the 'llama' baseline.
    model_family: str = _field(families.DEFAULT_FAMILY, _one_of(*families.FAMILIES))
    # The family's model config (`MegalodonConfig` or `LlamaConfig`).
    model: Any = dataclasses.field(default_factory=_default_model)
    # Seed of the parameter init, the dropout RNG and the training-window offsets.
    seed: int = _field(7, _ge(0))
    # Bytes per training sequence (windows hold seq_len + 1 bytes).
    seq_len: int = _field(512, _ge(2))
    # Global micro-batch: sequences per forward/backward pass, over all devices.
    batch_size: int = _field(16, _ge(1))
    # Micro-batches per update; the effective batch is batch_size * grad_accum_steps.
    grad_accum_steps: int = _field(1, _ge(1))
    # Optimizer updates.
    num_train_steps: int = _field(1200, _ge(1))
    # A step whose loss, gradient norm or update is NaN/inf: 'stop' the run, or 'skip' it.
    nan_policy: str = _field("stop", _one_of("stop", "skip"))
    # Write training scalars every this many steps.
    log_every_steps: int = _field(10, _ge(1))
    # Seconds between progress lines (steps/s, ETA).
    report_every_secs: float = _field(60.0, ((lambda v: v > 0), "> 0"))
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        family = families.get_family(self.model_family)
        data = self.data
        if not isinstance(self.model, family.config_class):
            raise ConfigError(
                f"config.model must be a {family.config_class.__name__} for model_family "
                f"{self.model_family!r}, got {type(self.model).__name__}"
            )
        if data.tokenizer is not None and data.source == "enwik8" and data.documents == "windows":
            raise ConfigError(
                "config.data.tokenizer needs packed documents: config.data.documents='pages' "
                "or config.data.source='text_files' (enwik8 windows are bytes)"
            )
        if data.tokenizer is None and (
            self.model.vocab_size < 256 or self.model.output_width < 256
        ):
            raise ConfigError(
                "config.model.vocab_size and the output width must be >= 256 for byte-level "
                f"data, got {self.model.vocab_size} and {self.model.output_width}"
            )
        if data.source == "text_files" and not data.text_paths:
            raise ConfigError(
                "config.data.source='text_files' needs config.data.text_paths (a folder, files "
                "or globs, comma-separated)"
            )
        if data.source != "enwik8" and data.documents != "windows":
            raise ConfigError(
                f"config.data.documents={data.documents!r} applies to enwik8 only; text_files "
                "are always packed documents"
            )
        if self.eval.mode != "window" and not family.carries_state:
            carrying = sorted(n for n, f in families.FAMILIES.items() if f.carries_state)
            raise ConfigError(
                f"config.eval.mode={self.eval.mode!r} needs a model with carried state (model "
                f"families {carrying}); the {self.model_family!r} family supports only 'window'"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Builds the config from a ConfigDict, a dict or a saved `config.json`.

        `config.json` files written before the config was nested (flat keys such as
        `learning_rate`) are read too.

        Raises:
            ConfigError: Naming the first unknown, mistyped or invalid field.
        """
        values = dict(_plain(values))
        sections = {f.name for f in dataclasses.fields(cls) if f.name in _SECTION_NAMES}
        if not sections & set(values):  # a config.json from before the nesting
            values = _nested_from_flat(values)
        family_name = values.get("model_family", families.DEFAULT_FAMILY)
        if "model_family" in values:
            _coerce("config.model_family", family_name, str)
        family = families.get_family(family_name)
        if "model" in values:
            model = _plain(values["model"])
            if not isinstance(model, Mapping):
                raise ConfigError(f"config.model must be a mapping, got {model!r}")
            try:
                values["model"] = family.config_class.from_mapping(model)
            except (ConfigError, TypeError) as err:
                raise ConfigError(f"config.model: {err}") from None
        elif family.name != families.DEFAULT_FAMILY:
            values["model"] = family.config_class()
        return super().from_mapping(values)

    @property
    def effective_batch_size(self) -> int:
        """Rows per optimizer update: batch_size * grad_accum_steps."""
        return self.batch_size * self.grad_accum_steps

    def to_config_dict(self) -> ml_collections.ConfigDict:
        """This config as a ConfigDict `config_flags` can override (None fields become typed
        placeholders)."""
        return ml_collections.ConfigDict(_with_placeholders(self))


def _with_placeholders(obj: Any) -> dict[str, Any]:
    hints = _type_hints(type(obj))
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = _with_placeholders(value)
        elif value is None:
            kind = next(a for a in typing.get_args(hints[f.name]) if a is not type(None))
            out[f.name] = config_dict.placeholder(kind)
        else:
            out[f.name] = value
    return out


def default_config() -> ml_collections.ConfigDict:
    """The enwik8 experiment as a ConfigDict (what `configs/*.py` start from)."""
    return TrainConfig().to_config_dict()


def model_config_dict(model_config: families.ModelConfig) -> ml_collections.ConfigDict:
    """A model config as the ConfigDict of `config.model` (None fields typed placeholders)."""
    return ml_collections.ConfigDict(_with_placeholders(model_config))


# Flat keys of config.json files written before the config was nested.
_FLAT_KEYS: dict[str, tuple[str, str]] = {
    "learning_rate": ("optimizer", "learning_rate"),
    "adam_b1": ("optimizer", "adam_b1"),
    "adam_b2": ("optimizer", "adam_b2"),
    "adam_eps": ("optimizer", "adam_eps"),
    "weight_decay": ("optimizer", "weight_decay"),
    "weight_decay_mask": ("optimizer", "weight_decay_mask"),
    "grad_clip_norm": ("optimizer", "grad_clip_norm"),
    "lr_schedule": ("schedule", "kind"),
    "warmup_steps": ("schedule", "warmup_steps"),
    "min_lr_ratio": ("schedule", "min_lr_ratio"),
    "eval_every_steps": ("eval", "every_steps"),
    "num_eval_batches": ("eval", "num_batches"),
    "eval_batch_size": ("eval", "batch_size"),
    "eval_split": ("eval", "split"),
    "eval_mode": ("eval", "mode"),
    "eval_stream_max_bytes": ("eval", "stream_max_bytes"),
    "eval_stream_num_streams": ("eval", "stream_num_streams"),
    "sample_every_steps": ("sampling", "every_steps"),
    "sample_prompt": ("sampling", "prompt"),
    "sample_length": ("sampling", "length"),
    "sample_temperature": ("sampling", "temperature"),
    "sample_top_k": ("sampling", "top_k"),
    "sample_top_p": ("sampling", "top_p"),
    "checkpoint_every_steps": ("checkpoint", "every_steps"),
    "max_checkpoints_to_keep": ("checkpoint", "max_to_keep"),
    "async_checkpointing": ("checkpoint", "async_save"),
    "mesh_shape": ("mesh", "shape"),
    "logical_axis_rules": ("mesh", "logical_axis_rules"),
    "data_dir": ("data", "data_dir"),
    "manual_dir": ("data", "manual_dir"),
    "allow_sample_fallback": ("data", "allow_sample_fallback"),
    "profile_num_steps": ("profile", "num_steps"),
    "profile_first_step": ("profile", "first_step"),
}


_SECTION_NAMES = frozenset(section for section, _ in _FLAT_KEYS.values())


def _nested_from_flat(values: Mapping[str, Any]) -> dict[str, Any]:
    """A flat (pre-nesting) config mapping in the nested layout; other keys pass through."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in _FLAT_KEYS:
            section, name = _FLAT_KEYS[key]
            out.setdefault(section, {})[name] = value
        else:
            out[key] = value
    return out
