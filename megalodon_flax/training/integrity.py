"""Integrity data of checkpoints: per-array SHA-256 checksums and the finiteness check.

Saving records, in the checkpoint's `integrity` JSON item, the SHA-256 of the bytes of every
array of the train state whose whole value the saving process holds, with its shape and
dtype. Process 0 writes the item. In a single-process run that is every array; in a
multi-process run it is the arrays replicated over all devices (the default data-parallel
mesh replicates the whole state) or held entirely by process 0. Arrays sharded across
processes (FSDP or tensor parallelism over several hosts) get no checksum, because process 0
cannot read their other shards; they are still checked for non-finite values.

Restoring recomputes the digests of the recorded arrays that the process holds whole (every
process checks its own copy, so all processes reach the same verdict) and names each array
whose bytes, shape or dtype differ. Checkpoints written before the checksums existed have no
`integrity` item: they restore with the finiteness check only. Independently of checksums,
a state with a NaN or infinite value is neither saved nor restored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

FORMAT_VERSION = 1
ALGORITHM = "sha256"


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """`[('params/model/embed/embedding', leaf), ...]` in tree order."""
    flat = jax.tree_util.tree_leaves_with_path(tree)
    return [("/".join(_key_name(k) for k in path), leaf) for path, leaf in flat]


def _local_value(leaf: Any) -> np.ndarray | None:
    """The whole value of `leaf` on this host, or None when other processes hold parts."""
    if isinstance(leaf, jax.Array):
        if leaf.is_fully_addressable:
            return np.asarray(leaf)
        if leaf.is_fully_replicated:
            return np.asarray(leaf.addressable_shards[0].data)
        return None
    return np.asarray(leaf)


def digest(value: np.ndarray) -> str:
    """SHA-256 of the C-order bytes of `value`."""
    data = np.ascontiguousarray(value)
    return hashlib.sha256(data.reshape(-1).view(np.uint8).data).hexdigest()


def checksums(state: Any) -> dict[str, Any]:
    """The `integrity` item of a checkpoint of `state` (see the module docstring)."""
    arrays = {}
    for name, leaf in named_leaves(state):
        value = _local_value(leaf)
        if value is not None:
            arrays[name] = {
                ALGORITHM: digest(value),
                "shape": list(value.shape),
                "dtype": str(value.dtype),
            }
    return {"version": FORMAT_VERSION, "algorithm": ALGORITHM, "arrays": arrays}


def damaged_arrays(state: Any, record: Mapping[str, Any]) -> list[str]:
    """Names of the arrays of `state` whose bytes do not match `record`, with the reason."""
    recorded = record.get("arrays", {})
    problems = []
    leaves = dict(named_leaves(state))
    for name, entry in recorded.items():
        if name not in leaves:
            problems.append(f"{name} (recorded but not in the restored state)")
            continue
        value = _local_value(leaves[name])
        if value is None:
            continue  # sharded across processes here: not checkable by this process
        if list(value.shape) != list(entry["shape"]) or str(value.dtype) != entry["dtype"]:
            problems.append(
                f"{name} (restored as {value.dtype}{list(value.shape)}, saved as "
                f"{entry['dtype']}{list(entry['shape'])})"
            )
        elif digest(value) != entry[ALGORITHM]:
            problems.append(f"{name} (checksum mismatch)")
    return problems


_FINITE_FNS: dict[Any, Any] = {}


def _finite_flags_fn(mesh: Any) -> Any:
    if mesh not in _FINITE_FNS:
        out = None if mesh is None else NamedSharding(mesh, PartitionSpec())

        def flags(leaves: list[jax.Array]) -> jax.Array:
            return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])

        _FINITE_FNS[mesh] = jax.jit(flags, out_shardings=out)
    return _FINITE_FNS[mesh]


def nonfinite_arrays(state: Any) -> list[str]:
    """Names of the floating-point arrays of `state` holding a NaN or an infinity.

    Runs on the devices (one compiled reduction, sharded like the state), so it covers
    arrays sharded across processes too; every process gets the same answer.
    """
    named = [
        (name, leaf)
        for name, leaf in named_leaves(state)
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    if not named:
        return []
    leaves = [jnp.asarray(leaf) for _, leaf in named]
    shardings = [getattr(x, "sharding", None) for x in leaves]
    mesh = shardings[0].mesh if isinstance(shardings[0], NamedSharding) else None
    if mesh is not None and not all(
        isinstance(s, NamedSharding) and s.mesh == mesh for s in shardings
    ):
        mesh = None
    flags = np.asarray(jax.device_get(_finite_flags_fn(mesh)(leaves)))
    return [name for (name, _), ok in zip(named, flags, strict=True) if not ok]
