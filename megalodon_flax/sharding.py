"""Logical axis names and the rules that map them onto mesh axes (the one place they live).

Model code names axes; these rules decide the layout. Mesh axes are ``data`` (batch
parallel), ``fsdp`` (batch parallel with parameters sharded along ``embed``), ``tensor``
(tensor parallel over the wide projections) and ``context`` (each sequence split along time:
`megalodon/context_parallel.py`). A size-1 mesh axis makes its rules no-ops, so the same
rules serve one GPU, pure data parallel, FSDP, tensor and context parallel runs.

Parameter axes:
  vocab       embedding rows / LM-head columns (V)            -> tensor
  embed       the model width D of weights                    -> fsdp
  embed_out   output side of the D×D / E×D projections wh1, wh2 -> tensor
  qk          shared Q/K width Z (wz, Q/K affine)             -> tensor
  value       value / gate width E (wv, wr, wh2 input)        -> tensor
  mlp         FFN hidden width F (fc1, fc2, fc3)              -> tensor
  cema        CEMA order N                                    -> replicated

Activation axes:
  batch       rows of a batch                                 -> (data, fsdp)
  length      time (of calls without a cache)                 -> context
  act_embed   model width of activations                      -> replicated
  act_mlp     FFN hidden activations                          -> tensor
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "context")
CONTEXT_AXIS = "context"

DEFAULT_LOGICAL_AXIS_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("length", CONTEXT_AXIS),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("embed_out", "tensor"),
    ("qk", "tensor"),
    ("value", "tensor"),
    ("mlp", "tensor"),
    ("cema", None),
    ("layers", None),
)


class MeshError(ValueError):
    """Raised for a mesh shape or axis rules that do not fit the devices."""


# ---------------------------------------------------------------------------------------- mesh
def resolve_mesh_shape(
    mesh_shape: Sequence[int], num_devices: int, *, allow_subset: bool = False
) -> tuple[int, ...]:
    """Returns `mesh_shape` with its (at most one) `-1` replaced by the remaining devices.

    Args:
        mesh_shape: Sizes of the mesh axes; one entry may be -1.
        num_devices: Devices available.
        allow_subset: Accept a mesh that uses fewer than `num_devices` devices.

    Raises:
        MeshError: On more than one -1, a size < 1, a mesh larger than the device count, a
            count not divisible by the fixed sizes, or (without `allow_subset`) unused devices.
    """
    shape = [int(s) for s in mesh_shape]
    if shape.count(-1) > 1:
        raise MeshError(f"mesh_shape {tuple(shape)} may contain at most one -1.")
    if any(s < 1 and s != -1 for s in shape):
        raise MeshError(f"mesh_shape {tuple(shape)} must hold positive sizes (or one -1).")
    known = math.prod(s for s in shape if s != -1)
    if known > num_devices:
        raise MeshError(
            f"mesh_shape {tuple(shape)} needs {known} devices but only {num_devices} "
            f"device(s) are available."
        )
    if -1 in shape:
        if num_devices % known:
            raise MeshError(
                f"mesh_shape {tuple(shape)}: {num_devices} devices are not divisible by the "
                f"fixed axis sizes (product {known})."
            )
        shape[shape.index(-1)] = num_devices // known
    total = math.prod(shape)
    if total < num_devices and not allow_subset:
        raise MeshError(
            f"mesh_shape {tuple(shape)} uses {total} of the {num_devices} devices; every device "
            "must belong to the mesh (use -1 on one axis to absorb the rest)."
        )
    return tuple(shape)


def make_mesh(
    mesh_shape: Sequence[int],
    axis_names: Sequence[str] = MESH_AXES,
    devices: Sequence[Any] | None = None,
) -> Mesh:
    """Builds a mesh with Auto axis types over `devices` (default: all devices).

    A mesh smaller than the device count is accepted only in a single-process run (it then
    uses the first devices); in a multi-process run every device must belong to the mesh.

    Args:
        mesh_shape: Sizes of the axes (one may be -1), e.g. `(-1, 1, 1, 1)` for data parallel.
        axis_names: Names of the axes, `MESH_AXES` by default.
        devices: Devices to use, in order; `jax.devices()` by default.

    Returns:
        A `jax.sharding.Mesh` whose axes are all `AxisType.Auto`.

    Raises:
        MeshError: If the shape does not fit the devices or the names do not match the shape.
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(axis_names) != len(mesh_shape):
        raise MeshError(
            f"mesh_shape {tuple(mesh_shape)} has {len(mesh_shape)} axes but the axis names "
            f"are {tuple(axis_names)}."
        )
    shape = resolve_mesh_shape(mesh_shape, len(devices), allow_subset=jax.process_count() == 1)
    used = math.prod(shape)
    if used < len(devices):
        logging.warning(
            "Mesh %s uses %d of the %d devices; the others stay idle.", shape, used, len(devices)
        )
    return Mesh(
        np.asarray(devices[:used], dtype=object).reshape(shape),
        tuple(axis_names),
        axis_types=(AxisType.Auto,) * len(shape),
    )


# ------------------------------------------------------------------------------- axis rules
def validate_rules(rules: Any, mesh_axes: Sequence[str] = MESH_AXES) -> LogicalRules:
    """Checks logical axis rules and returns them as a tuple of `(name, target)` pairs.

    Raises:
        MeshError: If a rule is malformed, names an unknown mesh axis, or a logical name
            appears twice.
    """
    out = []
    seen = set()
    for rule in rules:
        if not isinstance(rule, Sequence) or isinstance(rule, str) or len(rule) != 2:
            raise MeshError(f"logical_axis_rules entry {rule!r} must be a (name, target) pair.")
        name, target = rule
        if not isinstance(name, str):
            raise MeshError(f"logical_axis_rules entry {rule!r}: the name must be a string.")
        if name in seen:
            raise MeshError(f"logical_axis_rules maps {name!r} more than once.")
        seen.add(name)
        targets = () if target is None else (target,) if isinstance(target, str) else target
        for t in targets:
            if t not in mesh_axes:
                raise MeshError(
                    f"logical_axis_rules entry {rule!r} names mesh axis {t!r}, not one of "
                    f"{tuple(mesh_axes)}."
                )
        out.append(
            (name, None if target is None else target if isinstance(target, str) else tuple(target))
        )
    return tuple(out)


def logical_sharding(
    mesh: Mesh, rules: LogicalRules, logical_axes: Sequence[str | None]
) -> NamedSharding:
    """NamedSharding of an array whose dimensions carry the given logical names."""
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, P())


def batch_shards(mesh: Mesh, rules: LogicalRules) -> int:
    """Number of shards of the logical `batch` axis (the data-parallel degree) on `mesh`."""
    spec = nn.logical_to_mesh_axes(("batch",), rules)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[a] for a in axes)


def state_shardings(abstract_boxed_state: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """Maps a boxed (logically partitioned) abstract state to a tree of NamedShardings.

    Leaves without partitioning metadata (step counters, RNG keys, scalars) are replicated.
    """
    specs = nn.get_partition_spec(abstract_boxed_state)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def to_global_batch(
    local_batch: Mapping[str, np.ndarray], sharding: NamedSharding, global_rows: int, axis: int
) -> dict[str, jax.Array]:
    """Assembles the global batch from each process's rows.

    Args:
        local_batch: This process's arrays; their dimension `axis` holds its contiguous block
            of `global_rows // process_count` rows.
        sharding: Sharding of the global arrays (rows split over the data axes).
        global_rows: Size of dimension `axis` of the global arrays.
        axis: The row dimension.

    Returns:
        Global `jax.Array`s, each process contributing its local rows.
    """
    out = {}
    for key, value in local_batch.items():
        shape = list(value.shape)
        shape[axis] = global_rows
        out[key] = jax.make_array_from_process_local_data(sharding, value, tuple(shape))
    return out


def process_rows(
    batch_sharding: NamedSharding, global_shape: Sequence[int], axis: int
) -> tuple[int, int]:
    """Which rows of a global batch this process loads: block `index` of `count`.

    Under data parallelism over processes each process's devices hold one contiguous block of
    rows, in process order: `(process_index, process_count)`. When processes share rows (a
    context axis spanning processes splits each row's time steps between them) every process
    loads every row, `(0, 1)`, and keeps what its devices hold.

    Args:
        batch_sharding: Sharding of the global batch arrays.
        global_shape: Their shape.
        axis: The row dimension.
    """
    count = jax.process_count()
    if count == 1:
        return 0, 1
    rows = global_shape[axis]
    per_process = rows // count
    for device, index in batch_sharding.devices_indices_map(tuple(global_shape)).items():
        start, stop, _ = index[axis].indices(rows)
        block = device.process_index
        if rows % count or start < block * per_process or stop > (block + 1) * per_process:
            return 0, 1
    return jax.process_index(), count


# ------------------------------------------------------------------------ multi-process
_ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAX_PROCESS_ID"


def distributed_args(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any] | None:
    """Resolves the arguments of `jax.distributed.initialize` from flags and environment.

    Explicit values win over `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID`.

    Returns:
        `{'coordinator_address', 'num_processes', 'process_id'}`, or None when none is set.

    Raises:
        ValueError: If only some of the three are set, or they are inconsistent.
    """
    env = os.environ if environ is None else environ
    address = coordinator_address or env.get(_ENV_ADDRESS) or None
    try:
        if num_processes is None and env.get(_ENV_NUM_PROCESSES):
            num_processes = int(env[_ENV_NUM_PROCESSES])
        if process_id is None and env.get(_ENV_PROCESS_ID):
            process_id = int(env[_ENV_PROCESS_ID])
    except ValueError as err:
        raise ValueError(
            f"{_ENV_NUM_PROCESSES} and {_ENV_PROCESS_ID} must be integers: {err}"
        ) from err
    args = {
        "coordinator_address": address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if all(v is None for v in args.values()):
        return None
    missing = [k for k, v in args.items() if v is None]
    if missing:
        raise ValueError(
            f"A multi-process run needs coordinator_address, num_processes and process_id; "
            f"missing {missing} (flags --coordinator_address, --num_processes, --process_id "
            f"or environment variables {_ENV_ADDRESS}, {_ENV_NUM_PROCESSES}, {_ENV_PROCESS_ID})."
        )
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}.")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}.")
    if ":" not in address:
        raise ValueError(f"coordinator_address must be host:port, got {address!r}.")
    return args


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto_detect: bool = False,
) -> bool:
    """Joins a multi-process JAX run when asked; must run before any other JAX call.

    Values come from the arguments or the environment (see `distributed_args`). With
    `auto_detect` and no values, JAX detects the cluster (SLURM, Open MPI, Cloud TPU, ...).
    CPU processes exchange collectives through gloo.

    Args:
        coordinator_address: `host:port` of process 0's coordinator service.
        num_processes: Total number of processes.
        process_id: Index of this process in `[0, num_processes)`.
        auto_detect: Call `jax.distributed.initialize()` even when nothing is given.

    Returns:
        Whether `jax.distributed.initialize` was called.
    """
    args = distributed_args(coordinator_address, num_processes, process_id)
    if args is None and not auto_detect:
        return False
    # Only affects the CPU client; GPU and TPU use their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**(args or {}))
    logging.info(
        "Joined multi-process run: process %d of %d, %d local / %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
