"""The frozen-config base shared by the model families: ConfigError, dtypes, MappingConfig.

Every config is a frozen dataclass validated at construction; a bad value fails with a
`ConfigError` naming the field and the rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Self

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(ValueError):
    """Raised for an invalid configuration value."""


def check_dtype(name: str, value: Any, float16_reason: str) -> None:
    """Raises ConfigError unless `value` names a supported dtype (float16 gets `float16_reason`)."""
    if str(value) in ("float16", "half", "fp16"):
        raise ConfigError(
            f"{name}=float16 is not supported: {float16_reason}; use float32 or bfloat16"
        )
    if value not in DTYPES:
        raise ConfigError(f"{name} must be one of {tuple(DTYPES)}, got {value!r}")


class MappingConfig:
    """Construction from a dict or ConfigDict, `replace` and `to_dict` for frozen config
    dataclasses, and the dtype fields' validation and JAX dtypes.

    Subclasses declare the fields `param_dtype` and `compute_dtype` (keys of `DTYPES`).
    """

    param_dtype: str
    compute_dtype: str

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Self:
        """Builds a config from a mapping (a dict or an ml_collections ConfigDict).

        Unknown keys are rejected with their names listed. A boolean `remat` (the field
        before `remat_policy`, in configs saved by older runs) reads as "full" or "none".
        """
        if hasattr(values, "to_dict"):
            values = values.to_dict()
        values = dict(values)
        if "remat" in values and "remat_policy" not in values:
            values["remat_policy"] = "full" if values.pop("remat") else "none"
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys: {unknown}")
        return cls(**values)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def params_jnp_dtype(self) -> Any:
        """The JAX dtype of `param_dtype` (parameter storage)."""
        return DTYPES[self.param_dtype]

    @property
    def compute_jnp_dtype(self) -> Any:
        """The JAX dtype of `compute_dtype` (matmul inputs and activations)."""
        return DTYPES[self.compute_dtype]

    def _check_dtypes(self, float16_reason: str) -> None:
        """Raises ConfigError unless `param_dtype` and `compute_dtype` are supported."""
        for name in ("param_dtype", "compute_dtype"):
            check_dtype(name, getattr(self, name), float16_reason)
