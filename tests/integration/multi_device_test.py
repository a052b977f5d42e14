"""Training on 8 simulated CPU devices in child processes (XLA host platform device count).

Oracles: the same steps on this process's single device (losses and gradient norms), bitwise
checkpoints moved between 1 and 8 devices, and the expected errors for batches the data axis
does not divide.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from megalodon_flax.data import pipeline
from megalodon_flax.training import checkpointing
from megalodon_flax.training.setup import setup_training
from tests import helpers
from tests.factories import tiny_train_config

# --------------------------------------------------------------------- 8 simulated devices
_MESH_CHILD = """
import dataclasses
import json
import numpy as np
import jax
from tests import helpers
from megalodon_flax.data import pipeline
from megalodon_flax.training import checkpointing
from megalodon_flax.training.setup import setup_training

jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8
config = helpers.config_from_json({config!r})
data = np.frombuffer(bytes.fromhex({data!r}), np.uint8)
out = {{}}


def with_mesh(shape):
    return dataclasses.replace(config, mesh=dataclasses.replace(config.mesh, shape=shape))


# 1 device -> 8 devices: restore the parent's checkpoint onto a 2x1x4 mesh.
setup = setup_training(with_mesh((2, 1, 4, 1)))
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

for shape in [(8, 1, 1, 1), (2, 4, 1, 1), (2, 1, 4, 1)]:
    setup = setup_training(with_mesh(shape))
    assert dict(setup.mesh.shape) == dict(zip(("data", "fsdp", "tensor", "context"), shape))
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
    if shape == (2, 4, 1, 1):
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
    config = tiny_train_config(batch_size=8, optimizer={"learning_rate": 5e-3})
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
        config=helpers.config_to_json(config),
        data=data.tobytes().hex(),
        one_dev_dir=str(one_dev_dir),
        one_dev_npz=str(tmp_path / "one.npz"),
        eight_dev_dir=str(tmp_path / "eight"),
        eight_dev_npz=str(tmp_path / "eight.npz"),
    )
    proc = helpers.run_python(code, num_devices=8)
    out = json.loads(proc.stdout.split("RESULT", 1)[1])

    assert out["restored_from_1"] is True
    assert out["restored_sharded"] == [["tensor", "fsdp"], 8]
    for shape in ("(8, 1, 1, 1)", "(2, 4, 1, 1)", "(2, 1, 4, 1)"):
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


_DEVICES_CHILD = """
import json
from tests.factories import tiny_llama_train_mapping, tiny_train_config
from megalodon_flax import sharding
from megalodon_flax.training import loop
from megalodon_flax.training.config import TrainConfig

cases = [
    dict(mesh={{"shape": (8, 1, 1, 1)}}, batch_size=12),
    dict(mesh={{"shape": (8, 1, 1, 1)}}, eval={{"batch_size": 4}}),
    dict(mesh={{"shape": (2, 4, 1, 1)}}, batch_size=12),
    dict(mesh={{"shape": (16, 1, 1, 1)}}),
    dict(mesh={{"shape": (3, -1, 1, 1)}}),
    dict(mesh={{"shape": (1, 1, 1, 16)}}),
    dict(mesh={{"shape": (1, 1, 1, 8)}}, seq_len=32),
    dict(mesh={{"shape": (2, 1, 1, 4)}}, seq_len=64, model={{"timestep_norm_variant": "hf"}}),
    dict(mesh={{"shape": (2, 1, 1, 4)}}, seq_len=64, logical_axis_rules=True),
]
llama = tiny_llama_train_mapping(mesh={{"shape": (1, 1, 1, 8)}}, seq_len=64)
for case in cases:
    if case.pop("logical_axis_rules", False):
        rules = [r for r in sharding.DEFAULT_LOGICAL_AXIS_RULES if r[0] != "length"]
        case["mesh"]["logical_axis_rules"] = [*rules, ("length", None)]

out = []
for case in [*cases, None]:
    try:
        config = TrainConfig.from_mapping(llama) if case is None else tiny_train_config(**case)
        loop.train_and_evaluate(config, {workdir!r})
        out.append("no error")
    except Exception as err:
        out.append(type(err).__name__ + ": " + str(err))
print("RESULT" + json.dumps(out))
"""


def test_batch_not_divisible_by_data_axis_stops_on_eight_devices(tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    proc = helpers.run_python(_DEVICES_CHILD.format(workdir=str(workdir)), num_devices=8)
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out[0].startswith("ConfigError: config.batch_size=12 is not divisible by the 8")
    assert out[1].startswith("ConfigError: config.eval.batch_size=4 is not divisible by the 8")
    assert out[2].startswith("ConfigError: config.batch_size=12 is not divisible by the 8")
    assert out[3].startswith("ConfigError: config.mesh.shape (16, 1, 1, 1) (axes ")
    assert "needs 16 devices but only 8" in out[3]
    assert out[4].startswith("ConfigError: config.mesh.shape (3, -1, 1, 1) (axes ")
    assert "not divisible by the fixed axis sizes" in out[4]
    # The context axis: larger than the devices, chunks that do not split, a model or rules
    # that cannot split a sequence.
    assert out[5].startswith("ConfigError: config.mesh.shape (1, 1, 1, 16) (axes ")
    assert "needs 16 devices but only 8" in out[5]
    assert out[6] == (
        "ConfigError: config.mesh.shape gives the context axis 8 devices: config.seq_len=32 "
        "must be divisible by the context size × config.model.chunk_size = 8 × 8 = 64 (every "
        "shard holds whole chunks)"
    )
    assert "needs config.model.timestep_norm_variant='upstream', got 'hf'" in out[7]
    assert "maps 'length' to None; map it to 'context'" in out[8]
    assert out[9].startswith(
        "ConfigError: config.mesh.shape gives the context axis 8 devices, but model_family "
        "'llama' has no chunk structure"
    )
    assert not workdir.exists()
