"""Packed rows (segment ids) split over a context axis, on simulated CPU devices in child
processes (docs/context_parallel.md, "Packed rows").

The rows below put runs across shard boundaries (one across two), a run starting exactly at
a boundary, runs shorter than a chunk, padding inside, across a boundary and in front, and
shards that hold no run start. Oracles, computed in this process on one device: for each
component split 2 and 4 ways, the float64 reference run on every document alone and the
unsplit packed computation; for the whole model, the unsplit packed logits and gradients of
the packed loss (which `tests/megalodon/packing_test.py` checks against each document alone).
Attention dropout under a split must draw differently on every shard.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from megalodon_flax import sharding
from megalodon_flax.layers.segments import Segments, packed_target_weights, segments_from_ids
from megalodon_flax.megalodon import cema, cema_powers, context_parallel
from megalodon_flax.megalodon.chunked_attention import (
    packed_chunked_attention,
    sharded_packed_attention,
)
from megalodon_flax.megalodon.config import MegalodonConfig
from megalodon_flax.megalodon.model import MegalodonLM
from megalodon_flax.megalodon.timestep_norm import TimestepNorm
from tests import helpers
from tests.factories import tiny_megalodon_config
from tests.megalodon.cema_test import PARAM_NAMES, _random_params
from tests.reference import attention as attention_reference
from tests.reference import cema as cema_reference
from tests.reference import timestep_norm as norm_reference

pytestmark = pytest.mark.usefixtures("highest_precision")

# Run lengths and ids per row (id 0 = padding), 48 tokens: shards of 24 (P = 2) or 12 (P = 4).
ROWS = (
    ((5, 1), (19, 2), (2, 3), (1, 5), (8, 4), (3, 0), (10, 6)),  # a start at 24; 12–24: none
    ((3, 7), (30, 8), (3, 0), (12, 9)),  # run 8 crosses 12 and 24; a start at 36
    ((48, 5),),  # one document: only shard 0 holds a run start
    ((10, 0), (38, 2)),  # padding in front
)
L = 48
IDS = np.stack([np.concatenate([np.full(n, i, np.int32) for n, i in runs]) for runs in ROWS])
SHARDS = (2, 4)
CEMA_PATHS = ("fft", "scan", "sequential")
CHUNKS = (8, 6)  # query blocks of C/4 (shards of 12 are no multiple of 8), or whole chunks
GROUPS = 4
DROPOUT_SEED = 1


def documents() -> list[tuple[int, int, int]]:
    """(row, start, end) of every document run."""
    docs = []
    for b, runs in enumerate(ROWS):
        start = 0
        for n, i in runs:
            if i > 0:
                docs.append((b, start, start + n))
            start += n
    return docs


def segments() -> Segments:
    return segments_from_ids(jnp.asarray(IDS))


def context_split() -> context_parallel.ContextSplit:
    """The time axis split over the mesh's context axis, the rows whole."""
    return context_parallel.ContextSplit(axis=sharding.CONTEXT_AXIS, batch=())


# ------------------------------------------------------------------------------ components


def cema_inputs() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """CEMA parameters (D = 12, N = 4) and x (B, D, L) float32, zero at the padding."""
    params = _random_params(3, dim=12, ndim=4)
    x = np.random.default_rng(4).normal(size=(len(ROWS), 12, L)).astype(np.float32)
    return params, np.where(IDS[:, None, :] > 0, x, 0.0).astype(np.float32)


def cema_output(path: str, split: context_parallel.ContextSplit | None) -> jax.Array:
    params, x = cema_inputs()
    coeffs = cema_powers.cema_coefficients(*(jnp.asarray(params[n]) for n in PARAM_NAMES[:5]))
    omega = jnp.asarray(params["omega"])
    run = jax.jit(lambda x, s: cema.cema(coeffs, omega, x, path=path, split=split, segments=s))
    return run(jnp.asarray(x), segments())[0]


def cema_gradients(split: context_parallel.ContextSplit | None) -> tuple[jax.Array, ...]:
    """Gradients of a weighted sum of sin(y) ("fft" path) for the five coefficient
    parameters and x."""
    params, x = cema_inputs()
    weights = jnp.asarray(np.random.default_rng(8).normal(size=x.shape), jnp.float32)

    def loss(raw: tuple[jax.Array, ...], x: jax.Array, seg: Segments) -> jax.Array:
        coeffs = cema_powers.cema_coefficients(*raw)
        y, _ = cema.cema(coeffs, jnp.asarray(params["omega"]), x, split=split, segments=seg)
        return jnp.sum(jnp.sin(y) * weights)

    raw = tuple(jnp.asarray(params[n]) for n in PARAM_NAMES[:5])
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(raw, jnp.asarray(x), segments())
    return (*grads[0], grads[1])


def norm_inputs() -> tuple[np.ndarray, dict]:
    """x (B, L, 16) float32 with NaN at the padding, and TimestepNorm variables."""
    rng = np.random.default_rng(5)
    x = (3.0 * rng.normal(size=(len(ROWS), L, 16)) + 2.0).astype(np.float32)
    x[IDS == 0] = np.nan  # padding values must never reach the statistics
    weight = (0.3 * rng.normal(size=16)).astype(np.float32)
    bias = rng.normal(size=16).astype(np.float32)
    return x, {"params": {"weight": weight, "bias": bias}}


def norm_output(split: context_parallel.ContextSplit | None) -> jax.Array:
    x, variables = norm_inputs()
    norm = TimestepNorm(GROUPS, 1e-5)
    run = jax.jit(lambda x, s: norm.apply(variables, x, split=split, segments=s)[0])
    return run(jnp.asarray(x), segments())


def attention_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(6)
    return tuple(rng.normal(size=(len(ROWS), L, 2, 8)).astype(np.float32) for _ in range(3))


def repeated_shards_inputs() -> tuple[jax.Array, ...]:
    """q, k, v (1, L, 2, 8) and ids that repeat every half row (shards of P = 2 alike)."""
    q, k, v = (jnp.tile(a[:1, : L // 2], (1, 2, 1, 1)) for a in attention_inputs())
    return q, k, v, jnp.repeat(jnp.arange(1, 3), L // 2)[None]


def repeated_shards_dropout(split: context_parallel.ContextSplit) -> jax.Array:
    """`sharded_packed_attention` with dropout (rate 0.5, chunks of 8) of the inputs whose
    two shards are alike."""
    q, k, v, ids = repeated_shards_inputs()
    run = jax.jit(
        lambda q, k, v, s: sharded_packed_attention(
            q, k, v, 8, s, split, dropout_rate=0.5, dropout_key=jax.random.key(DROPOUT_SEED)
        )
    )
    return run(q, k, v, segments_from_ids(ids))


def split_components() -> dict[str, np.ndarray]:
    """Every component over the packed rows split 2 and 4 ways (run in the child)."""
    out = {}
    q, k, v = (jnp.asarray(a) for a in attention_inputs())
    split = context_split()
    for shards in SHARDS:
        with jax.set_mesh(sharding.make_mesh((1, 1, 1, shards))):
            for path in CEMA_PATHS:
                out[f"cema {path} {shards}"] = cema_output(path, split)
            for i, grad in enumerate(cema_gradients(split)):
                out[f"cema gradient {i} {shards}"] = grad
            out[f"norm {shards}"] = norm_output(split)
            for chunk in CHUNKS:
                run = jax.jit(
                    lambda q, k, v, s, c=chunk: sharded_packed_attention(q, k, v, c, s, split)
                )
                out[f"attention {chunk} {shards}"] = run(q, k, v, segments())
            if shards == 2:
                out["dropout"] = repeated_shards_dropout(split)
            if shards == 4:
                try:
                    sharded_packed_attention(q, k, v, 16, segments(), split)
                    out["short shards"] = np.asarray("no error")
                except ValueError as error:
                    out["short shards"] = np.asarray(str(error))
    return {key: np.asarray(value) for key, value in out.items()}


_COMPONENTS_CHILD = """
import numpy as np
import jax
from tests.integration import context_parallel_packed_test as t

jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 4
np.savez({out!r}, **t.split_components())
"""


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> dict[str, np.ndarray]:
    """The components split 2 and 4 ways, computed in a child with 4 CPU devices."""
    out = tmp_path_factory.mktemp("packed_split") / "components.npz"
    helpers.run_python(_COMPONENTS_CHILD.format(out=str(out)), num_devices=4)
    return dict(np.load(out))


@pytest.mark.parametrize("path", CEMA_PATHS)
def test_split_cema_resets_at_every_run_start(split, path):
    params, x = cema_inputs()
    unsplit = np.asarray(cema_output(path, None))
    for shards in SHARDS:
        got = split[f"cema {path} {shards}"]
        np.testing.assert_allclose(got, unsplit, rtol=0, atol=1e-5, err_msg=str(shards))
        for b, start, end in documents():
            want, _ = cema_reference.recurrence(params, x[b : b + 1, :, start:end])
            np.testing.assert_allclose(got[b, :, start:end], want[0], rtol=1e-5, atol=1e-5)


def test_split_cema_gradients_equal_unsplit(split):
    for i, want in enumerate(cema_gradients(None)):
        scale = float(np.max(np.abs(want)))
        for shards in SHARDS:
            got = split[f"cema gradient {i} {shards}"]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale, err_msg=f"{i}")


def test_split_timestep_norm_restarts_at_every_run_start(split):
    x, variables = norm_inputs()
    weight, bias = variables["params"]["weight"], variables["params"]["bias"]
    unsplit = np.asarray(norm_output(None))
    for shards in SHARDS:
        got = split[f"norm {shards}"]
        np.testing.assert_array_equal(got[IDS == 0], 0.0)
        np.testing.assert_allclose(got, unsplit, rtol=0, atol=1e-5, err_msg=str(shards))
        for b, start, end in documents():
            want, *_ = norm_reference.brute_force(
                x[b : b + 1, start:end], weight, bias, GROUPS, 1e-5
            )
            np.testing.assert_allclose(got[b, start:end], want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_split_attention_takes_the_previous_shards_keys(split, chunk):
    q, k, v = attention_inputs()
    unsplit = np.asarray(
        packed_chunked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), chunk, segments())
    )
    for shards in SHARDS:
        got = split[f"attention {chunk} {shards}"]
        np.testing.assert_array_equal(got[IDS == 0], 0.0)
        np.testing.assert_allclose(got, unsplit, rtol=0, atol=1e-6, err_msg=str(shards))
        for b, start, end in documents():
            doc = slice(start, end)
            want = attention_reference.dense_chunked_attention(
                q[b : b + 1, doc], k[b : b + 1, doc], v[b : b + 1, doc], chunk
            )
            np.testing.assert_allclose(got[b, doc], want[0], rtol=1e-5, atol=1e-5)


def test_split_attention_dropout_draws_per_shard(split):
    q, k, v, ids = repeated_shards_inputs()
    plain = np.asarray(packed_chunked_attention(q, k, v, 8, segments_from_ids(ids)))
    np.testing.assert_array_equal(plain[:, : L // 2], plain[:, L // 2 :])
    dropped = split["dropout"]
    assert np.isfinite(dropped).all()
    assert np.max(np.abs(dropped - plain)) > 0.1
    assert np.max(np.abs(dropped[:, : L // 2] - dropped[:, L // 2 :])) > 0.1


def test_shards_shorter_than_a_chunk_are_refused(split):
    assert "at least chunk_size = 16 tokens per shard" in str(split["short shards"])


# ------------------------------------------------------------------------------ the model

MODELS = {
    "fft": tiny_megalodon_config(),
    "scan_layers_associative": tiny_megalodon_config(cema_path="scan", scan_layers=True),
}
# (data, fsdp, tensor, context) meshes per model; the rows split over data × context too.
MESHES = {
    "fft": ((2, 1, 1, 2),),
    "scan_layers_associative": ((1, 1, 1, 4),),
}
# The input window's ids: the last run gains the target of the last input.
WINDOW_IDS = np.concatenate([IDS, IDS[:, -1:]], axis=1)


def window_tokens() -> np.ndarray:
    """Random tokens (B, L + 1) of the vocabulary of 64."""
    return np.random.default_rng(7).integers(0, 64, size=WINDOW_IDS.shape).astype(np.int32)


def packed_logits_and_gradients(config: MegalodonConfig, params) -> dict[str, np.ndarray]:
    """Logits and per-leaf gradients of the packed next-token loss (under the active mesh)."""
    model = MegalodonLM(config)
    tokens = jnp.asarray(window_tokens())

    def loss(p, inputs, targets, weights, segment_ids):
        logits, _ = model.apply({"params": p}, inputs, segment_ids=segment_ids)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(ce * weights), logits

    args = (
        tokens[:, :-1],
        tokens[:, 1:],
        packed_target_weights(jnp.asarray(WINDOW_IDS)),
        jnp.asarray(IDS),
    )
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, *args)
    out = {"logits": np.asarray(logits)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        out["grad" + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


@contextlib.contextmanager
def mesh_active(shape: tuple[int, ...]) -> Iterator[None]:
    """The mesh of `shape` and the default logical axis rules, active."""
    with (
        jax.set_mesh(sharding.make_mesh(shape)),
        nn.logical_axis_rules(sharding.DEFAULT_LOGICAL_AXIS_RULES),
    ):
        yield


def split_model(params_dir: str) -> dict[str, np.ndarray]:
    """The packed logits and gradients of every model on its meshes, and a dropout run (the
    child's work); the parameters come from `params_dir`."""
    out = {}
    for name, config in MODELS.items():
        data = (Path(params_dir) / f"{name}.msgpack").read_bytes()
        params = flax.serialization.msgpack_restore(data)
        for shape in MESHES[name]:
            with mesh_active(shape):
                for key, value in packed_logits_and_gradients(config, params).items():
                    out[f"{name} {shape} {key}"] = value
    # The model's attention dropout under a split (the fft model's parameters).
    model = MegalodonLM(MODELS["fft"].replace(attention_dropout=0.5))
    params = flax.serialization.msgpack_restore((Path(params_dir) / "fft.msgpack").read_bytes())
    with mesh_active((1, 1, 1, 2)):
        apply = jax.jit(
            lambda p, t, s: model.apply(
                {"params": p},
                t,
                segment_ids=s,
                deterministic=False,
                rngs={"dropout": jax.random.key(DROPOUT_SEED)},
            )[0]
        )
        out["dropout"] = np.asarray(apply(params, jnp.asarray(window_tokens()[:, :-1]), IDS))
    return out


_MODEL_CHILD = """
import numpy as np
import jax
from tests.integration import context_parallel_packed_test as t

jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 4
np.savez({out!r}, **t.split_model({params_dir!r}))
"""


@pytest.mark.slow
def test_split_packed_logits_and_gradients_equal_unsplit(tmp_path: Path):
    want = {}
    for name, config in MODELS.items():
        model = MegalodonLM(config)
        params = nn.unbox(model.init(jax.random.key(0), jnp.asarray(IDS))["params"])
        (tmp_path / f"{name}.msgpack").write_bytes(
            flax.serialization.msgpack_serialize(jax.device_get(params))
        )
        want[name] = packed_logits_and_gradients(config, params)
    out = tmp_path / "model.npz"
    code = _MODEL_CHILD.format(out=str(out), params_dir=str(tmp_path))
    helpers.run_python(code, num_devices=4)
    got = dict(np.load(out))

    for name in MODELS:
        for shape in MESHES[name]:
            for key, value in want[name].items():
                scale = float(np.max(np.abs(value)))
                np.testing.assert_allclose(
                    got[f"{name} {shape} {key}"], value, rtol=0, atol=1e-5 * scale,
                    err_msg=f"{name} {shape} {key}",
                )  # fmt: skip
    assert np.isfinite(got["dropout"]).all()
    assert np.max(np.abs(got["dropout"] - want["fft"]["logits"])) > 1e-3


def packed_corpus(root: Path) -> str:
    """Text files of 3 to 150 bytes: documents shorter than a chunk and longer than a shard."""
    rng = np.random.default_rng(11)
    for i, n in enumerate(rng.integers(3, 150, size=24)):
        text = "".join(rng.choice(list("abcdefgh ij\n"), size=int(n)))
        (root / f"doc{i:02d}.txt").write_text(text)
    return str(root / "*.txt")


def packed_training_losses(corpus: str, mesh_shape: tuple[int, ...]) -> list[float]:
    """Losses of 3 train steps on packed text_files rows of 64 bytes under `mesh_shape`."""
    import dataclasses

    from megalodon_flax.data import training_data
    from megalodon_flax.training.setup import setup_training
    from tests.factories import tiny_train_config

    config = tiny_train_config(
        seq_len=64,
        batch_size=4,
        model={"num_layers": 2},
        data={"source": "text_files", "text_paths": corpus, "eval_fraction": 0.2},
    )
    config = dataclasses.replace(config, mesh=dataclasses.replace(config.mesh, shape=mesh_shape))
    setup = setup_training(config)
    iterator = training_data.load(config, *setup.train_rows).new_train_iterator(None)
    state, losses = setup.init_state(), []
    for _ in range(3):
        batch = next(iterator)
        assert (np.diff(batch["segment_ids"], axis=1) != 0).any()  # documents start mid-row
        state, metrics = setup.train_step(state, batch)
        losses.append(float(jax.device_get(metrics.compute())["loss"]))
    return losses


_LOOP_CHILD = """
import json
import jax
from tests.integration import context_parallel_packed_test as t

jax.config.update("jax_default_matmul_precision", "highest")
print("RESULT" + json.dumps(t.packed_training_losses({corpus!r}, (2, 1, 1, 2))))
"""


def test_packed_training_on_a_context_axis_matches_one_device(tmp_path: Path):
    """Training steps on packed text_files rows, each row split over 2 devices and the rows
    over 2 more, give the losses of one device."""
    corpus = packed_corpus(tmp_path)
    want = packed_training_losses(corpus, (1, 1, 1, 1))
    proc = helpers.run_python(_LOOP_CHILD.format(corpus=corpus), num_devices=4)
    got = json.loads(proc.stdout.split("RESULT", 1)[1])
    np.testing.assert_allclose(got, want, rtol=1e-5)
