"""Tests of the mesh helpers and of training on simulated 8-device meshes."""

from __future__ import annotations

import json
from pathlib import Path

import _train_utils as tu
import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

from megalodon_flax import sharding
from megalodon_flax.data import pipeline
from megalodon_flax.training import checkpointing
from megalodon_flax.training.setup import setup_training


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
    mesh = sharding.make_mesh((-1, 1, 1))
    assert mesh.axis_names == sharding.MESH_AXES
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(sharding.MeshError, match="needs"):
        sharding.make_mesh((jax.device_count() + 1, 1, 1))
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
    mesh = AbstractMesh((2, 4, 3), sharding.MESH_AXES)
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


def test_global_train_batch_groups_rows_into_micro_batches() -> None:
    """Row r of the effective batch is row r // A of micro-batch r % A."""
    setup = setup_training(tu.tiny_config(batch_size=2, grad_accum_steps=3))
    rows = np.arange(6 * 16, dtype=np.int32).reshape(6, 16)
    batch = setup.global_train_batch({"inputs": rows, "targets": rows, "weights": rows * 1.0})
    got = np.asarray(batch["inputs"])
    assert got.shape == (3, 2, 16)
    for r in range(6):
        np.testing.assert_array_equal(got[r % 3, r // 3], rows[r])


# --------------------------------------------------------------------- 8 simulated devices
_MESH_CHILD = """
import dataclasses
import json
import numpy as np
import jax
import _train_utils as tu
from megalodon_flax.data import pipeline
from megalodon_flax.training import checkpointing
from megalodon_flax.training.setup import setup_training

jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8
config = tu.config_from_json({config!r})
data = np.frombuffer(bytes.fromhex({data!r}), np.uint8)
out = {{}}


def with_mesh(shape):
    return dataclasses.replace(config, mesh=dataclasses.replace(config.mesh, shape=shape))


# 1 device -> 8 devices: restore the parent's checkpoint onto a 2x1x4 mesh.
setup = setup_training(with_mesh((2, 1, 4)))
manager = checkpointing.create_manager({one_dev_dir!r}, max_to_keep=2)
step, state, _ = checkpointing.restore_latest(manager, setup.abstract_state, {{}})
manager.close()
want = np.load({one_dev_npz!r})
leaves = jax.tree_util.tree_leaves_with_path(state)
out["restored_from_1"] = all(
    np.array_equal(np.asarray(x), want[jax.tree_util.keystr(p)]) for p, x in leaves
) and len(leaves) == len(want.files)
emb = state.params["model"]["embed"]["embedding"]
out["restored_sharded"] = [list(tuple(emb.sharding.spec)), len(emb.addressable_shards)]

for shape in [(8, 1, 1), (2, 4, 1), (2, 1, 4)]:
    setup = setup_training(with_mesh(shape))
    assert dict(setup.mesh.shape) == dict(zip(("data", "fsdp", "tensor"), shape))
    state = setup.init_state()
    it = pipeline.TrainIterator(
        data, seq_len=config.seq_len, global_batch_size=config.batch_size, seed=4
    )
    losses, norms = [], []
    for _ in range(3):
        state, m = setup.train_step(state, next(it))
        r = jax.device_get(m.compute())
        losses.append(float(r["loss"]))
        norms.append(float(r["grad_norm"]))
    out[str(shape)] = {{"loss": losses, "grad_norm": norms}}
    if shape == (2, 4, 1):
        # 8 devices -> 1 device: the parent restores this one.
        manager = checkpointing.create_manager({eight_dev_dir!r}, max_to_keep=2)
        checkpointing.save(manager, 3, state, {{"step": 3}}, {{}})
        manager.wait_until_finished()
        manager.close()
        np.savez({eight_dev_npz!r}, **{{
            jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(state)
        }})
print("RESULT" + json.dumps(out))
"""


def _flat_numpy(state) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(p): np.asarray(x)
        for p, x in jax.tree_util.tree_leaves_with_path(state)
    }


@pytest.mark.slow
def test_meshes_match_one_device_and_checkpoints_move_between_them(tmp_path: Path) -> None:
    config = tu.tiny_config(batch_size=8, optimizer={"learning_rate": 5e-3})
    data = np.random.default_rng(9).integers(0, 256, 5000, dtype=np.uint8)

    # Reference on this process's single device.
    with jax.default_matmul_precision("highest"):
        setup = setup_training(config)
        assert jax.device_count() == 1 and setup.mesh.size == 1
        state = setup.init_state()
        it = pipeline.TrainIterator(data, seq_len=16, global_batch_size=8, seed=4)
        ref_loss, ref_norm = [], []
        for _ in range(3):
            state, m = setup.train_step(state, next(it))
            r = jax.device_get(m.compute())
            ref_loss.append(float(r["loss"]))
            ref_norm.append(float(r["grad_norm"]))
    one_dev_dir = tmp_path / "one"
    manager = checkpointing.create_manager(one_dev_dir, max_to_keep=2)
    checkpointing.save(manager, 3, state, {"step": 3}, {})
    manager.wait_until_finished()
    manager.close()
    np.savez(tmp_path / "one.npz", **_flat_numpy(state))

    code = _MESH_CHILD.format(
        config=tu.config_to_json(config),
        data=data.tobytes().hex(),
        one_dev_dir=str(one_dev_dir),
        one_dev_npz=str(tmp_path / "one.npz"),
        eight_dev_dir=str(tmp_path / "eight"),
        eight_dev_npz=str(tmp_path / "eight.npz"),
    )
    proc = tu.run_python(code, num_devices=8)
    out = json.loads(proc.stdout.split("RESULT", 1)[1])

    assert out["restored_from_1"] is True
    assert out["restored_sharded"] == [["tensor", "fsdp"], 8]
    for shape in ("(8, 1, 1)", "(2, 4, 1)", "(2, 1, 4)"):
        np.testing.assert_allclose(out[shape]["loss"], ref_loss, rtol=1e-5, err_msg=shape)
        np.testing.assert_allclose(out[shape]["grad_norm"], ref_norm, rtol=1e-5, err_msg=shape)

    # 8 devices -> 1 device, bitwise.
    manager = checkpointing.create_manager(tmp_path / "eight", max_to_keep=2)
    step, restored, data_state = checkpointing.restore_latest(manager, setup.abstract_state, {})
    manager.close()
    assert step == 3 and data_state == {"step": 3}
    want = np.load(tmp_path / "eight.npz")
    got = _flat_numpy(restored)
    assert sorted(got) == sorted(want.files)
    for key, value in got.items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)
