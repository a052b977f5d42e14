"""Context parallelism on simulated CPU devices, in child processes.

Oracle: the same computation on this process's single device: the losses and gradient norms
of 3 training steps on each mesh, logits and every parameter's gradient of one batch on the
two meshes that split the most ways, and the steps after a checkpoint. The child runs the
meshes (data, fsdp, tensor, context) = (1,1,1,8), (2,1,1,4), (1,2,1,4) and (2,1,2,2); a second
test splits the context axis over 2 processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax.data import pipeline
from megalodon_flax.training import checkpointing, loop
from megalodon_flax.training.config import TrainConfig
from megalodon_flax.training.metrics import weighted_loss_sum
from megalodon_flax.training.setup import setup_training
from tests import helpers
from tests.factories import tiny_train_config

MESHES = ((1, 1, 1, 8), (2, 1, 1, 4), (1, 2, 1, 4), (2, 1, 2, 2))
# Logits and per-leaf gradients are compared on these (the steps' losses and gradient norms on
# every mesh); each costs a compilation of its own.
GRADIENT_MESHES = ((1, 1, 1, 8), (2, 1, 2, 2))
DATA_SEED = 9
# bf16 matmuls round differently when the reductions are split: the relative tolerance of
# the bf16 + remat + scanned + gradient-accumulation run against one device.
BF16_RTOL = 1e-2


def base_config(**overrides: Any):
    """Two layers, chunks of 8, 256-byte sequences: 4 chunks per shard at P = 8."""
    model = {"num_layers": 2, **overrides.pop("model", {})}
    return tiny_train_config(
        seq_len=256, batch_size=4, optimizer={"learning_rate": 5e-3}, model=model, **overrides
    )


def composed_config():
    """bf16 compute, full remat, scanned layers and 2 accumulated micro-batches."""
    model = {"compute_dtype": "bfloat16", "remat_policy": "full", "scan_layers": True}
    return base_config(grad_accum_steps=2, model=model)


def train_data() -> np.ndarray:
    return np.random.default_rng(DATA_SEED).integers(0, 256, 30_000, dtype=np.uint8)


def run_steps(setup, state, steps: int, start: int = 0) -> tuple[Any, list[float], list[float]]:
    """`steps` train steps from data step `start`: the state, losses and gradient norms."""
    it = pipeline.TrainIterator(
        train_data(),
        seq_len=setup.config.seq_len,
        global_batch_size=setup.config.effective_batch_size,
        seed=4,
        process_index=setup.train_rows[0],
        process_count=setup.train_rows[1],
        state={"step": start},
    )
    losses, norms = [], []
    for _ in range(steps):
        state, metrics = setup.train_step(state, next(it))
        result = jax.device_get(metrics.compute())
        losses.append(float(result["loss"]))
        norms.append(float(result["grad_norm"]))
    return state, losses, norms


def logits_and_grads(setup, params) -> dict[str, np.ndarray]:
    """Logits and per-leaf gradients of the mean loss of one fixed batch, under the mesh."""
    rows = setup.config.eval.batch_size
    batch = next(iter(pipeline.eval_batches(train_data(), seq_len=256, global_batch_size=rows)))
    batch = setup.global_eval_batch(batch)

    def loss(p):
        logits, _ = setup.model.apply({"params": p}, batch["inputs"])
        total, _, _ = weighted_loss_sum(logits, batch["targets"], batch["weights"])
        return total / jnp.sum(batch["weights"]), logits

    with setup.activate():
        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    out = {"logits": np.asarray(logits)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        out["grad" + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def worst_relative_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    """max over arrays of max|got − want| / max|want|."""
    assert sorted(got) == sorted(want)
    return max(
        float(np.max(np.abs(got[k] - want[k])) / max(np.max(np.abs(want[k])), 1e-30)) for k in want
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Any]:
    """The single-device oracle (this process has one CPU device)."""
    assert jax.device_count() == 1
    root = tmp_path_factory.mktemp("context_reference")
    with jax.default_matmul_precision("highest"):
        setup = setup_training(base_config())
        state = setup.init_state()
        np.savez(root / "arrays.npz", **logits_and_grads(setup, state.params))
        _, losses, norms = run_steps(setup, state, 5)
        composed = setup_training(composed_config())
        _, c_losses, c_norms = run_steps(composed, composed.init_state(), 3)
    return {
        "root": root,
        "setup": setup,
        "arrays": str(root / "arrays.npz"),
        "loss": losses,
        "grad_norm": norms,
        "composed_loss": c_losses,
        "composed_grad_norm": c_norms,
    }


_MESHES_CHILD = """
import json
import numpy as np
import jax
from megalodon_flax.training import checkpointing
from megalodon_flax.training.setup import setup_training
from tests.integration import context_parallel_test as t
import dataclasses

jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8
want = dict(np.load({arrays!r}))
out = {{}}
setups = {{}}


def setup_for(config, shape):
    key = (id(config), shape)
    if key not in setups:
        config = dataclasses.replace(config, mesh=dataclasses.replace(config.mesh, shape=shape))
        setups[key] = setup_training(config)
    return setups[key]


base = t.base_config()
for shape in t.MESHES:
    setup = setup_for(base, shape)
    state = setup.init_state()
    if shape in t.GRADIENT_MESHES:
        got = t.logits_and_grads(setup, state.params)
        out[str(shape) + " error"] = t.worst_relative_error(got, want)
    state, losses, norms = t.run_steps(setup, state, 3)
    out[str(shape)] = {{"loss": losses, "grad_norm": norms}}
    if shape == (1, 1, 1, 8):
        manager = checkpointing.create_manager({ckpt!r}, max_to_keep=2)
        checkpointing.save(manager, 3, state, {{"step": 3}}, {{}})
        checkpointing.finish(manager)

# The context-8 checkpoint continues with context size 4 (and on one device, in the parent).
setup = setup_for(base, (2, 1, 1, 4))
manager = checkpointing.create_manager({ckpt!r}, max_to_keep=2)
step, state, _ = checkpointing.restore_latest(manager, setup.abstract_state, {{}})
manager.close()
out["resumed"] = t.run_steps(setup, state, 2, start=step)[1]

composed = t.composed_config()
setup = setup_for(composed, (2, 1, 1, 4))
_, losses, norms = t.run_steps(setup, setup.init_state(), 3)
out["composed"] = {{"loss": losses, "grad_norm": norms}}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_meshes_with_a_context_axis_match_one_device(reference, tmp_path: Path) -> None:
    ckpt = tmp_path / "context8"
    code = _MESHES_CHILD.format(arrays=reference["arrays"], ckpt=str(ckpt))
    out = json.loads(helpers.run_python(code, num_devices=8).stdout.split("RESULT", 1)[1])

    for shape in MESHES:
        name = str(shape)
        np.testing.assert_allclose(out[name]["loss"], reference["loss"][:3], rtol=1e-5)
        np.testing.assert_allclose(out[name]["grad_norm"], reference["grad_norm"][:3], rtol=1e-5)
    for shape in GRADIENT_MESHES:
        assert out[f"{shape} error"] <= 1e-5, (shape, out[f"{shape} error"])
    # Mesh-free checkpoints: written with context 8, continued with 4 and on one device.
    np.testing.assert_allclose(out["resumed"], reference["loss"][3:], rtol=1e-5)
    setup = reference["setup"]
    manager = checkpointing.create_manager(ckpt, max_to_keep=2)
    step, state, _ = checkpointing.restore_latest(manager, setup.abstract_state, {})
    manager.close()
    with jax.default_matmul_precision("highest"):
        _, losses, _ = run_steps(setup, state, 2, start=step)
    np.testing.assert_allclose(losses, reference["loss"][3:], rtol=1e-5)
    # bf16 compute, full remat and gradient accumulation together.
    got = out["composed"]
    np.testing.assert_allclose(got["loss"], reference["composed_loss"], rtol=BF16_RTOL)
    np.testing.assert_allclose(got["grad_norm"], reference["composed_grad_norm"], rtol=BF16_RTOL)


_PROCESS_CHILD = """
import json
import sys
from megalodon_flax import sharding

sharding.initialize_distributed({address!r}, 2, int(sys.argv[1]))
import jax
import dataclasses
from megalodon_flax.training.setup import setup_training
from tests.integration import context_parallel_test as t

jax.config.update("jax_default_matmul_precision", "highest")
config = t.base_config()
config = dataclasses.replace(config, mesh=dataclasses.replace(config.mesh, shape=(1, 1, 1, 8)))
setup = setup_training(config)
_, losses, norms = t.run_steps(setup, setup.init_state(), 3)
print("RESULT" + json.dumps({{"rows": setup.train_rows, "loss": losses, "grad_norm": norms}}))
"""


@pytest.mark.slow
def test_context_axis_across_two_processes_matches_one_device(reference) -> None:
    code = _PROCESS_CHILD.format(address=f"127.0.0.1:{helpers.free_port()}")
    commands = [[sys.executable, "-c", code, str(i)] for i in range(2)]
    results = helpers.run_together(commands, env=helpers.subprocess_env(num_devices=4))
    for i, result in enumerate(results):
        assert result.returncode == 0, f"process {i}:\n{result.stderr[-6000:]}"
        got = json.loads(result.stdout.split("RESULT", 1)[1])
        assert got["rows"] == [0, 1]  # both processes feed every row, each its half of time
        np.testing.assert_allclose(got["loss"], reference["loss"][:3], rtol=1e-5)
        np.testing.assert_allclose(got["grad_norm"], reference["grad_norm"][:3], rtol=1e-5)


def long_smoke_config(data_dir: str, manual_dir: str):
    """`configs/megalodon_long.py` with a small model, 4,096-byte sequences and 2 steps,
    evaluated in both modes and sampled at the end."""
    from configs import megalodon_long

    config = megalodon_long.get_config()
    config.model.update(
        model_dim=16, num_layers=2, num_heads=2, z_dim=8, value_dim=16, ffn_hidden_dim=32,
        cema_ndim=2, chunk_size=64, norm_num_groups=2, compute_dtype="float32",
    )  # fmt: skip
    config.seq_len = 4096
    config.num_train_steps = 2
    config.log_every_steps = 1
    config.schedule.warmup_steps = 1
    config.eval.update(every_steps=2, num_batches=1, mode="both", stream_max_bytes=2048)
    config.checkpoint.every_steps = 2
    config.sampling.update(every_steps=2, length=16)
    config.profile.num_steps = 0
    config.data.update(data_dir=data_dir, manual_dir=manual_dir)
    return config


_LONG_CONFIG = """
from tests.integration.context_parallel_test import long_smoke_config


def get_config():
    return long_smoke_config({data_dir!r}, {manual_dir!r})
"""


@pytest.mark.slow
def test_long_context_recipe_trains_over_eight_devices_like_one(tmp_path: Path) -> None:
    """The long-context recipe on a context axis of 8 devices (a child process running
    `main.py`) against the same run on this process's one device."""
    data_dir, manual_dir = helpers.make_enwik8_dirs(tmp_path / "data", num_bytes=120_000)
    config_path = tmp_path / "long_config.py"
    config_path.write_text(_LONG_CONFIG.format(data_dir=data_dir, manual_dir=manual_dir))
    proc = subprocess.run(
        helpers.main_command(config_path, tmp_path / "eight"),
        cwd=helpers.REPO_ROOT,
        env=helpers.subprocess_env(num_devices=8),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 1, 'context': 8}" in proc.stderr

    config = long_smoke_config(data_dir, manual_dir)
    config.mesh.shape = (1, 1, 1, 1)
    with jax.default_matmul_precision("highest"):
        loop.train_and_evaluate(TrainConfig.from_mapping(config), tmp_path / "one")
    for tag in ("train_loss", "grad_norm", "eval_loss", "eval_stream_loss"):
        want = helpers.read_scalars(tmp_path / "one", tag)
        got = helpers.read_scalars(tmp_path / "eight", tag)
        assert sorted(got) == sorted(want) and want, tag
        for step in want:
            np.testing.assert_allclose(got[step], want[step], rtol=1e-5, err_msg=f"{tag} {step}")
    assert helpers.read_texts(tmp_path / "eight", "sample")
