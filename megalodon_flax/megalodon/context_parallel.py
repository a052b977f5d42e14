"""Context parallelism: one sequence split along time over a mesh axis (docs/context_parallel.md).

When the logical `length` axis maps to a mesh axis of P > 1 devices (the `context` axis of the
training mesh), a call without a cache splits each sequence into P contiguous shards of L/P
tokens. Attention, RoPE and every per-token layer are local to a shard when L/P is a multiple
of the chunk size. What crosses shards is the state of the two recurrences, TimestepNorm and
CEMA: each shard reduces its tokens to a small summary, one all-gather over the axis shares the
summaries, and each shard folds the summaries of the shards before it into its incoming state
(an exclusive prefix). Over packed rows a summary also says whether its shard holds a run
start, which cuts the fold, and attention takes the previous shard's last chunk of keys and
values (a run crossing the boundary keeps its own chunk grid). This module holds the
mesh-facing pieces; `timestep_norm`, `cema` and `chunked_attention` hold the summaries, their
merges and the halo attention. It also holds `per_row`, which runs a function on each device's
own rows when the sequence is not split (XLA's partitioner gathers a batched FFT over the batch
axes, so that every device would transform every row).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ContextSplit:
    """How a call's sequences are split: `axis` splits time, `batch` the rows.

    The sharded functions are manual over both (the rows too: left to the compiler inside a
    manual region, batched FFTs were gathered over the batch axes).
    """

    axis: str
    batch: tuple[str, ...]

    def spec(self, *dims: str | None) -> PartitionSpec:
        """A PartitionSpec from dimension roles: 'batch', 'length' or None (replicated)."""
        table = {"batch": self.batch or None, "length": self.axis, None: None}
        return PartitionSpec(*(table[d] for d in dims))

    def map(self, fn: Callable[..., Any], in_specs: Any, out_specs: Any) -> Callable[..., Any]:
        """`fn` run per shard (`jax.shard_map`, manual over `axis` and `batch`; any other
        mesh axis stays under the compiler's automatic partitioning)."""
        names = {self.axis, *self.batch}
        return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, axis_names=names)

    def vary(self, tree: T) -> T:
        """`tree` (alike on every shard) marked as per-shard values over every manual axis.

        Whatever a shard derives from a replicated input it mixes with its own rows and
        tokens; marked here, the backward pass sums the input's cotangents over the shards
        once (their size is the input's), instead of summing each derived array (sized by
        the shard length).
        """
        names = (self.axis, *self.batch)
        return jax.tree.map(lambda a: jax.lax.pcast(a, names, to="varying"), tree)

    @property
    def size(self) -> int:
        """P, the devices of the time axis in the active mesh."""
        return jax.sharding.get_abstract_mesh().shape[self.axis]

    def gather(self, tree: T) -> T:
        """Every shard's `tree` stacked on a new leading axis of size P (alike on all shards).

        Boolean leaves travel as int32 (collectives of booleans are not supported everywhere).
        """

        def gathered(a: jax.Array) -> jax.Array:
            if a.dtype == jnp.bool_:
                return jax.lax.all_gather(a.astype(jnp.int32), self.axis, to="invarying") > 0
            return jax.lax.all_gather(a, self.axis, to="invarying")

        return jax.tree.map(gathered, tree)

    def from_previous(self, tree: T) -> T:
        """Shard i − 1's `tree` on shard i, zeros on shard 0 (one `ppermute` per leaf)."""
        pairs = [(i, i + 1) for i in range(jax.lax.axis_size(self.axis) - 1)]
        return jax.tree.map(lambda a: jax.lax.ppermute(a, self.axis, pairs), tree)

    def shard_index(self) -> jax.Array:
        """() int32: this shard's index over the batch axes and the time axis together."""
        return jax.lax.axis_index((*self.batch, self.axis))

    def exclusive_fold(self, gathered: T, combine: Callable[[T, T], T], identity: T) -> tuple[T, T]:
        """Folds gathered per-shard summaries in shard order.

        Args:
            gathered: Per-shard summaries stacked on a leading axis of size P (`gather`).
            combine: `combine(before, shard)`, the summary of `before` followed by `shard`.
            identity: The summary of no tokens (built without per-shard values).

        Returns:
            The fold over the shards before this one (this shard's incoming summary) and the
            fold over all P shards (alike on every shard).
        """
        size = jax.tree.leaves(gathered)[0].shape[0]
        index = jax.lax.axis_index(self.axis)
        before, total = identity, identity
        for j in range(size):
            shard = jax.tree.map(lambda a, j=j: a[j], gathered)
            total = combine(total, shard)
            before = jax.tree.map(lambda t, b, j=j: jnp.where(j < index, t, b), total, before)
        return before, total


def _mesh_axes(logical: str, rules: Any) -> tuple[str, ...]:
    target = nn.logical_to_mesh_axes((logical,), rules)[0]
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def active_split(batch: int, length: int) -> ContextSplit | None:
    """How a call of `batch` rows of `length` tokens splits over the active mesh, or None.

    The time axis is the mesh axis the logical `length` axis maps to under the active logical
    axis rules (`nn.logical_axis_rules`) and mesh (`jax.set_mesh`), when it has more than one
    device and divides `length` (and the axes of `batch` divide the rows). Otherwise (no mesh,
    a size-1 axis, a shape that does not split) the call runs unsplit.

    Raises:
        ValueError: If `length` maps to more than one mesh axis.
    """
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return None
    names = _mesh_axes("length", rules)
    if not names:
        return None
    if len(names) != 1:
        raise ValueError(
            f"the logical axis 'length' maps to the mesh axes {names}; context parallelism "
            "splits a sequence over one mesh axis"
        )
    size = mesh.shape.get(names[0], 1)
    rows = _mesh_axes("batch", rules)
    if size <= 1 or length % size or batch % math.prod(mesh.shape[a] for a in rows):
        return None
    return ContextSplit(axis=names[0], batch=rows)


def row_axes(batch: int) -> tuple[str, ...]:
    """The mesh axes (of more than one device) that the logical `batch` axis maps to under the
    active rules and mesh, when they divide `batch`; () otherwise (no mesh, size-1 axes)."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return ()
    axes = tuple(a for a in _mesh_axes("batch", rules) if mesh.shape.get(a, 1) > 1)
    if not axes or batch % math.prod(mesh.shape[a] for a in axes):
        return ()
    return axes


def per_row(fn: Callable[[Any, Any], T], replicated: Any, rows: Any) -> T:
    """fn(replicated, rows) with each device's rows on their own.

    `rows` is a pytree whose leaves lead with the B rows, and so is fn's result. Over the
    mesh axes of `row_axes(B)` fn runs per shard of rows (`jax.shard_map`, manual over those
    axes only); without them it is called directly. `replicated` (alike for every row) is
    marked per-shard inside, so that the backward pass sums its cotangents over the shards
    once, at its own size.
    """
    axes = row_axes(jax.tree.leaves(rows)[0].shape[0])
    if not axes:
        return fn(replicated, rows)

    def body(replicated: Any, rows: Any) -> T:
        local = jax.tree.map(lambda a: jax.lax.pcast(a, axes, to="varying"), replicated)
        return fn(local, rows)

    spec = PartitionSpec(axes)
    mapped = jax.shard_map(
        body, in_specs=(PartitionSpec(), spec), out_specs=spec, axis_names=set(axes)
    )
    return mapped(replicated, rows)
