"""Tiny configs for the tests: one factory per model family and one for the training system.

Every factory takes keyword overrides of its fields; a test module that needs its own sizes
calls the factory with them (`tiny_megalodon_config(vocab_size=61, swiglu=True)`) or binds them
once with `functools.partial`, so each variant reads as the default plus what makes it differ.
The `*_fields` functions return the same values as a plain dict, for the tests that build a
config themselves (construction, `from_mapping`, a `ConfigDict`, a mapping-driven oracle).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from megalodon_flax.llama.config import LlamaConfig
from megalodon_flax.megalodon.config import MegalodonConfig

# Two float32 layers 32 wide, 2 heads of Q/K width 8, chunks of 8 tokens; every other field
# keeps the `MegalodonConfig` default (HF bias topology and tying, FFT CEMA, no SwiGLU).
TINY_MEGALODON = MappingProxyType(
    {
        "vocab_size": 64,
        "model_dim": 32,
        "num_layers": 2,
        "num_heads": 2,
        "z_dim": 16,
        "value_dim": 32,
        "ffn_hidden_dim": 64,
        "cema_ndim": 4,
        "chunk_size": 8,
        "norm_num_groups": 4,
    }
)

# Two float32 layers 32 wide with 4 heads of width 8.
TINY_LLAMA = MappingProxyType(
    {"vocab_size": 64, "model_dim": 32, "num_layers": 2, "num_heads": 4, "ffn_hidden_dim": 48}
)


def tiny_megalodon_fields(**overrides: Any) -> dict[str, Any]:
    """`TINY_MEGALODON` updated with `overrides`, as a dict of `MegalodonConfig` fields."""
    return {**TINY_MEGALODON, **overrides}


def tiny_megalodon_config(**overrides: Any) -> MegalodonConfig:
    """The tiny `MegalodonConfig` with `overrides` (validated: a bad value raises)."""
    return MegalodonConfig(**tiny_megalodon_fields(**overrides))


def tiny_llama_fields(**overrides: Any) -> dict[str, Any]:
    """`TINY_LLAMA` updated with `overrides`, as a dict of `LlamaConfig` fields."""
    return {**TINY_LLAMA, **overrides}


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """The tiny `LlamaConfig` with `overrides` (validated: a bad value raises)."""
    return LlamaConfig(**tiny_llama_fields(**overrides))


def tiny_train_config_dict(**overrides: Any):
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


def tiny_train_config(**overrides: Any):
    """`tiny_train_config_dict(**overrides)` as the validated `TrainConfig`."""
    from megalodon_flax.training.config import TrainConfig

    return TrainConfig.from_mapping(tiny_train_config_dict(**overrides))


def tiny_llama_train_mapping(**overrides: Any) -> dict[str, Any]:
    """`tiny_train_config_dict(**overrides)` with a one-layer Llama 16 wide instead of the
    Megalodon model (`model_family='llama'`), as the plain dict a `config.json` holds."""
    out = tiny_train_config_dict(**overrides).to_dict()
    out["model_family"] = "llama"
    out["model"] = tiny_llama_fields(
        vocab_size=256, model_dim=16, num_layers=1, num_heads=2, ffn_hidden_dim=32
    )
    return out
