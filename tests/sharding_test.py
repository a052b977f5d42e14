"""Tests of the mesh helpers (megalodon_flax.sharding): mesh shapes, axis rules, batch shards,
the multi-process arguments. Oracles: the expected shapes and messages, worked out by hand.
(Training on simulated 8-device meshes: `tests/integration/multi_device_test.py`.)
"""

from __future__ import annotations

import jax
import pytest
from jax.sharding import AbstractMesh, AxisType

from megalodon_flax import sharding


# ------------------------------------------------------------------------------ mesh shapes
@pytest.mark.parametrize(
    ("shape", "devices", "want"),
    [
        ((-1, 1, 1), 8, (8, 1, 1)),
        ((2, -1, 1), 8, (2, 4, 1)),
        ((2, 1, -1), 8, (2, 1, 4)),
        ((1, 1, 1), 1, (1, 1, 1)),
        ((-1, 2, 2), 8, (2, 2, 2)),
    ],
)
def test_resolve_mesh_shape(shape, devices, want) -> None:
    assert sharding.resolve_mesh_shape(shape, devices) == want


@pytest.mark.parametrize(
    ("shape", "devices", "message"),
    [
        ((16, 1, 1), 8, "needs 16 devices but only 8"),
        ((2, 1, 1), 1, "needs 2 devices but only 1"),
        ((-1, -1, 1), 8, "at most one -1"),
        ((0, 1, 1), 8, "positive sizes"),
        ((-1, 3, 1), 8, "not divisible"),
        ((2, 2, 1), 8, "uses 4 of the 8 devices"),
    ],
)
def test_resolve_mesh_shape_rejects(shape, devices, message) -> None:
    with pytest.raises(sharding.MeshError, match=message):
        sharding.resolve_mesh_shape(shape, devices)


def test_subset_mesh_only_when_allowed() -> None:
    assert sharding.resolve_mesh_shape((2, 2, 1), 8, allow_subset=True) == (2, 2, 1)


def test_make_mesh_uses_auto_axes_and_names() -> None:
    mesh = sharding.make_mesh((-1, 1, 1, 1))
    assert mesh.axis_names == sharding.MESH_AXES
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1, "context": 1}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(sharding.MeshError, match="needs"):
        sharding.make_mesh((jax.device_count() + 1, 1, 1, 1))
    with pytest.raises(sharding.MeshError, match="axis names"):
        sharding.make_mesh((-1, 1))


# ----------------------------------------------------------------------------------- rules
def test_validate_rules() -> None:
    assert sharding.validate_rules(sharding.DEFAULT_LOGICAL_AXIS_RULES) == tuple(
        sharding.DEFAULT_LOGICAL_AXIS_RULES
    )
    as_lists = [list(r) for r in sharding.DEFAULT_LOGICAL_AXIS_RULES]
    assert sharding.validate_rules(as_lists) == sharding.DEFAULT_LOGICAL_AXIS_RULES
    with pytest.raises(sharding.MeshError, match="'model'"):
        sharding.validate_rules((("mlp", "model"),))
    with pytest.raises(sharding.MeshError, match="more than once"):
        sharding.validate_rules((("mlp", "tensor"), ("mlp", None)))
    with pytest.raises(sharding.MeshError, match="pair"):
        sharding.validate_rules((("mlp",),))


def test_batch_shards_counts_the_axes_batch_maps_to() -> None:
    mesh = AbstractMesh((2, 4, 3, 2), sharding.MESH_AXES)
    assert sharding.batch_shards(mesh, sharding.DEFAULT_LOGICAL_AXIS_RULES) == 8
    assert sharding.batch_shards(mesh, (("batch", "data"),)) == 2
    assert sharding.batch_shards(mesh, (("batch", None),)) == 1


# --------------------------------------------------------------------------- multi-process
def test_distributed_args_from_flags_and_environment() -> None:
    assert sharding.distributed_args(environ={}) is None
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert sharding.distributed_args(environ=env) == {
        "coordinator_address": "h:1",
        "num_processes": 4,
        "process_id": 3,
    }
    assert sharding.distributed_args("x:2", 2, 0, environ=env) == {
        "coordinator_address": "x:2",
        "num_processes": 2,
        "process_id": 0,
    }
    with pytest.raises(ValueError, match="missing"):
        sharding.distributed_args("x:2", environ={})
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
        sharding.distributed_args("x:2", 2, 2, environ={})
    with pytest.raises(ValueError, match="host:port"):
        sharding.distributed_args("x", 2, 1, environ={})
    assert sharding.initialize_distributed() is False  # nothing asked: single process
