"""The two layer layouts of Megalodon parameters, and the conversion between them.

Unrolled (`scan_layers=False`): one subtree per block, `model/layers_0` ... `layers_{L-1}`.
Scanned (`scan_layers=True`): one subtree `model/layers` whose leaves carry a leading
num_layers axis (logical axis "layers"). The conversion works on any nested mapping that
holds a parameter tree at any depth (of arrays, NumPy arrays or `jax.ShapeDtypeStruct`s),
so it also converts optimizer states (AdamW's `mu` and `nu`) and whole train states in
their serialized (nested dict) form.

A checkpoint of either layout restores into a run of the other (`training.checkpointing`
converts on restore); by hand it is one line:

    params = layer_stack.to_layout(params, config.scan_layers)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

STACKED_KEY = "layers"
_UNROLLED_KEY = re.compile(r"^layers_(\d+)$")


def _unrolled_indices(tree: Mapping[str, Any]) -> list[int]:
    return sorted(int(m.group(1)) for k in tree if (m := _UNROLLED_KEY.match(str(k))))


def layout_of(tree: Any) -> str | None:
    """The layer layout of `tree`: "scanned", "unrolled", or None when it holds no block
    subtree."""
    if isinstance(tree, list | tuple):
        return next((found for t in tree if (found := layout_of(t)) is not None), None)
    if not isinstance(tree, Mapping):
        return None
    if _unrolled_indices(tree):
        return "unrolled"
    if STACKED_KEY in tree and isinstance(tree[STACKED_KEY], Mapping):
        return "scanned"
    for value in tree.values():
        found = layout_of(value)
        if found is not None:
            return found
    return None


def _sequence_like(tree: list | tuple, items: list[Any]) -> Any:
    if hasattr(tree, "_fields"):  # a namedtuple (optax states)
        return type(tree)(*items)
    return type(tree)(items)


def _stack(*arrays: Any) -> Any:
    first = arrays[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(
            (len(arrays), *first.shape), first.dtype, sharding=_respec(first.sharding, 1)
        )
    if all(isinstance(a, np.ndarray) for a in arrays):
        return np.stack(arrays)
    return jnp.stack(arrays)


def _take(stacked: Any, i: int) -> Any:
    if isinstance(stacked, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(
            stacked.shape[1:], stacked.dtype, sharding=_respec(stacked.sharding, -1)
        )
    return stacked[i]


def _respec(sharding: Any, change: int) -> Any:
    """A NamedSharding with a leading unsharded axis added (+1) or removed (-1)."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec)
    spec = (None, *spec) if change > 0 else spec[1:]
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def stack_layers(tree: Any) -> Any:
    """Every `{layers_0: t0, ..., layers_{L-1}: t_{L-1}}` group in `tree` → `{layers: T}`,
    T's leaves stacked on a new leading axis (t_i's leaves must agree in shape)."""
    if isinstance(tree, list | tuple):
        return _sequence_like(tree, [stack_layers(t) for t in tree])
    if not isinstance(tree, Mapping):
        return tree
    indices = _unrolled_indices(tree)
    out = {k: stack_layers(v) for k, v in tree.items() if not _UNROLLED_KEY.match(str(k))}
    if indices:
        if indices != list(range(len(indices))):
            raise ValueError(f"layer subtrees are not numbered 0..L-1: {indices}")
        blocks = [tree[f"layers_{i}"] for i in indices]
        out[STACKED_KEY] = jax.tree.map(_stack, *blocks)
    return out


def unstack_layers(tree: Any) -> Any:
    """The inverse of `stack_layers`: `{layers: T}` → `{layers_i: T[i]}` for every i."""
    if isinstance(tree, list | tuple):
        return _sequence_like(tree, [unstack_layers(t) for t in tree])
    if not isinstance(tree, Mapping):
        return tree
    out = {k: unstack_layers(v) for k, v in tree.items() if k != STACKED_KEY}
    stacked = tree.get(STACKED_KEY)
    if isinstance(stacked, Mapping):
        leaves = jax.tree.leaves(stacked)
        count = leaves[0].shape[0] if leaves else 0
        for i in range(count):
            out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: _take(a, i), stacked)
    elif STACKED_KEY in tree:
        out[STACKED_KEY] = stacked
    return out


def to_layout(tree: Any, scan_layers: bool) -> Any:
    """`tree` (parameters, an optimizer state or a state dict, either layout) in the layout
    of a config with `scan_layers`; returned unchanged when it is already in it. Boxed
    (`nn.Partitioned`) leaves come back unboxed when converted."""
    current = layout_of(tree)
    if current is None or (current == "scanned") == scan_layers:
        return tree
    tree = nn.unbox(tree)
    return stack_layers(tree) if scan_layers else unstack_layers(tree)
