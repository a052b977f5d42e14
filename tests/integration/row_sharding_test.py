"""Data parallelism keeps CEMA on each device's own rows.

Left to XLA's partitioner, a batched FFT is gathered over the batch axes, so that every
device transforms every row of the global batch; `context_parallel.per_row` runs CEMA per
shard of rows instead. Oracle: the logits and gradients of one device, and the compiled
program's FFT shapes (the local rows only). Children run on 8 simulated CPU devices.
"""

from __future__ import annotations

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from megalodon_flax import sharding
from megalodon_flax.megalodon import layer_stack
from megalodon_flax.megalodon.model import MegalodonLM
from tests import helpers
from tests.factories import tiny_megalodon_config

BATCH, LENGTH = 8, 32
# (scan_layers, mesh shape (data, fsdp, tensor, context)): rows split 8 ways, and 2 ways
# with the channels' mesh axis (tensor) or 8 ways over data and fsdp, with scanned layers.
CASES = ((False, (8, 1, 1, 1)), (True, (2, 1, 4, 1)), (True, (2, 4, 1, 1)))
# The rows each device's batched FFTs transform: B / (data · fsdp).
LOCAL_ROWS = {(8, 1, 1, 1): 1, (2, 1, 4, 1): 4, (2, 4, 1, 1): 1}
BATCHED_FFT = re.compile(r"= (?:c64|f32)\[(\d+),\d+,\d+\]\{[\d,]*\} fft\(")


def _config(scan_layers: bool):
    return tiny_megalodon_config(chunk_size=8, scan_layers=scan_layers)


def _inputs() -> tuple[dict, jax.Array]:
    """Unrolled parameters of the tiny model and (B, L) tokens."""
    cfg = _config(False)
    tokens = jax.random.randint(jax.random.key(1), (BATCH, LENGTH), 0, cfg.vocab_size)
    params = jax.jit(MegalodonLM(cfg).init)(jax.random.key(0), tokens)["params"]
    return nn.unbox(params), tokens


def _loss_and_grads(scan_layers: bool):
    model = MegalodonLM(_config(scan_layers))

    def loss(params: dict, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = model.apply({"params": params}, tokens)[0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def sharded_runs() -> dict[str, np.ndarray]:
    """Logits, gradients (unrolled layout) and batched-FFT row counts of every case (the
    child's work)."""
    params, tokens = _inputs()
    out = {}
    for scan_layers, shape in CASES:
        step = _loss_and_grads(scan_layers)
        with (
            jax.set_mesh(sharding.make_mesh(shape)),
            nn.logical_axis_rules(sharding.DEFAULT_LOGICAL_AXIS_RULES),
        ):
            laid_out = layer_stack.to_layout(params, scan_layers)
            compiled = step.lower(laid_out, tokens).compile()
            (_, logits), grads = compiled(laid_out, tokens)
        key = f"{scan_layers} {shape}"
        out[f"{key} fft rows"] = np.asarray(
            [int(m) for m in BATCHED_FFT.findall(compiled.as_text())], np.int64
        )
        out[f"{key} logits"] = np.asarray(logits)
        grads = layer_stack.to_layout(grads, scan_layers=False)
        for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
            out[f"{key} grad{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    return out


_CHILD = """
import numpy as np
from tests.integration import row_sharding_test as t
np.savez({out!r}, **t.sharded_runs())
"""


def test_each_device_transforms_only_its_rows_and_matches_one_device(tmp_path: Path) -> None:
    out = tmp_path / "runs.npz"
    helpers.run_python(_CHILD.format(out=str(out)), num_devices=8)
    got = dict(np.load(out))
    params, tokens = _inputs()
    with jax.default_matmul_precision("highest"):
        (_, logits), grads = _loss_and_grads(False)(params, tokens)
    for scan_layers, shape in CASES:
        key = f"{scan_layers} {shape}"
        rows = got[f"{key} fft rows"]
        assert rows.size > 0 and set(rows.tolist()) == {LOCAL_ROWS[shape]}, (key, rows)
        np.testing.assert_allclose(got[f"{key} logits"], logits, atol=2e-5, rtol=2e-5)
        for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
            name = f"{key} grad{jax.tree_util.keystr(path)}"
            scale = float(np.max(np.abs(leaf))) + 1e-12
            np.testing.assert_allclose(got[name], leaf, atol=2e-5 * scale, rtol=0, err_msg=name)
