"""Tests of the training loop: schedules, losses, train/eval steps, accumulation, end to end."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import zipfile
from pathlib import Path

import _train_utils as tu
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from megalodon_flax import evaluation, families
from megalodon_flax.data import enwik8, pipeline
from megalodon_flax.training import loop, metrics, optimizer
from megalodon_flax.training.setup import TrainingSetup, setup_training
from megalodon_flax.training.steps import create_train_state


def _np_log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_cross_entropy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logp = _np_log_softmax(logits)
    return -np.take_along_axis(logp, targets[..., None].astype(np.int64), -1)[..., 0]


def _eval_batches(config, data: np.ndarray):
    """Evaluation batches of `config.eval.batch_size` rows (what the training loop feeds)."""
    num = config.eval.num_batches
    return pipeline.eval_batches(
        data,
        seq_len=config.seq_len,
        global_batch_size=config.eval.batch_size,
        max_batches=None if num == -1 else num,
    )


def _random_batch(seed: int, rows: int, seq_len: int) -> dict[str, np.ndarray]:
    data = np.random.default_rng(seed).integers(0, 256, 5000, dtype=np.uint8)
    return pipeline.train_batch(data, 0, seq_len=seq_len, global_batch_size=rows, seed=seed)


# ------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("kind", ["cosine", "linear", "rsqrt", "constant"])
def test_learning_rate_schedule_matches_float64_formula(kind: str) -> None:
    config = tu.tiny_config(
        schedule={"kind": kind, "warmup_steps": 10, "min_lr_ratio": 0.1},
        optimizer={"learning_rate": 4e-4},
        num_train_steps=110,
    )
    fn = optimizer.create_learning_rate_fn(config)
    peak, warmup, total, floor = 4e-4, 10, 110, 0.1
    for step in [0, 1, 4, 9, 10, 11, 35, 60, 109, 110, 150]:
        if step < warmup:
            want = peak * (step + 1) / warmup
        else:
            p = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
            want = {
                "cosine": peak * (floor + (1 - floor) * (1 + math.cos(math.pi * p)) / 2),
                "linear": peak * (1 - (1 - floor) * p),
                "rsqrt": peak * math.sqrt(warmup / max(step + 1, warmup)),
                "constant": peak,
            }[kind]
        np.testing.assert_allclose(float(fn(step)), want, rtol=1e-6, err_msg=f"{kind} {step}")
    # Peak reached at the end of the warmup; cosine/linear end at the floor.
    assert float(fn(warmup - 1)) == pytest.approx(peak, rel=1e-6)
    if kind in ("cosine", "linear"):
        assert float(fn(total)) == pytest.approx(peak * floor, rel=1e-6)


def test_constant_schedule_without_warmup_is_flat() -> None:
    config = tu.tiny_config(schedule={"kind": "constant", "warmup_steps": 0})
    fn = optimizer.create_learning_rate_fn(config)
    values = np.array([float(fn(s)) for s in range(0, 50, 7)])
    np.testing.assert_array_equal(values, np.float32(1e-2))


# ---------------------------------------------------------------------------------- losses
def test_weighted_loss_matches_numpy_and_ignores_padding() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (3, 7))
    weights = (rng.random((3, 7)) > 0.3).astype(np.float32)
    logits_bad = logits.copy()
    logits_bad[weights == 0] = np.nan  # padded positions may hold anything
    total, count, per_token = metrics.weighted_loss_sum(
        jnp.asarray(logits_bad), jnp.asarray(targets), jnp.asarray(weights)
    )
    want = _np_cross_entropy(logits, targets)
    np.testing.assert_allclose(float(total), (want * weights).sum(), rtol=1e-6)
    assert float(count) == weights.sum()
    np.testing.assert_allclose(np.asarray(per_token)[weights > 0], want[weights > 0], rtol=1e-5)
    assert metrics.nats_to_bits(math.log(256)) == pytest.approx(8.0)


# --------------------------------------------------------------------------- optimizer
def test_weight_decay_mask_matrices_skips_vectors() -> None:
    config = tu.tiny_config(
        optimizer={"weight_decay": 0.5, "weight_decay_mask": "matrices", "grad_clip_norm": 0.0}
    ).optimizer
    tx = optimizer.create_optimizer(config, lambda step: 0.1)
    params = {"w": jnp.ones((2, 3)), "b": jnp.ones((3,))}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.1 * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(updates["b"]), 0.0)
    config = dataclasses.replace(config, weight_decay_mask="all")
    tx = optimizer.create_optimizer(config, lambda step: 0.1)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["b"]), -0.1 * 0.5, rtol=1e-6)


def test_gradient_clipping_applies_before_adamw() -> None:
    """With eps = 1, Adam's first update is -lr * g / (|g| + 1), which reveals the clipping."""
    grads = {"w": jnp.array([30.0, 40.0, 0.0])}  # global norm 50
    params = {"w": jnp.zeros((3,))}
    for clip, g in ((1.0, np.array([0.6, 0.8, 0.0])), (0.0, np.array([30.0, 40.0, 0.0]))):
        config = tu.tiny_config(
            optimizer={"grad_clip_norm": clip, "weight_decay": 0.0, "adam_eps": 1.0}
        )
        tx = optimizer.create_optimizer(config.optimizer, lambda step: 1.0)
        updates, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(np.asarray(updates["w"]), -g / (np.abs(g) + 1.0), rtol=1e-6)


# ------------------------------------------------------------------------------ train step
SHARED_CONFIG = dict(
    optimizer={"weight_decay": 0.1, "grad_clip_norm": 0.5, "learning_rate": 3e-3},
    eval={"batch_size": 4, "num_batches": -1},
    sampling={"temperature": 0.0, "prompt": "ab", "length": 5},
)


@pytest.fixture(scope="module")
def shared() -> TrainingSetup:
    """One compiled setup reused by the step, evaluation and sampling tests."""
    with jax.default_matmul_precision("highest"):
        return setup_training(tu.tiny_config(**SHARED_CONFIG))


@pytest.fixture(scope="module")
def apply_fn(shared: TrainingSetup):
    """Jitted forward pass, the independent path of the oracles below."""
    with jax.default_matmul_precision("highest"):
        fn = jax.jit(lambda params, tokens: shared.model.apply({"params": params}, tokens)[0])
    return fn


def test_train_step_matches_independent_gradient_and_adamw(shared, apply_fn) -> None:
    config = shared.config
    with jax.default_matmul_precision("highest"):
        state = shared.init_state()
        params0 = jax.device_get(state.params)
        opt0 = jax.device_get(state.opt_state)
        batch = _random_batch(1, config.batch_size, config.seq_len)
        state, step_metrics = shared.train_step(state, batch)
        result = jax.device_get(step_metrics.compute())

        # Second path: plain mean loss, jax.grad, the optimizer applied by hand.
        @jax.jit
        def reference_update(params, opt_state):
            def mean_loss(p):
                logits = apply_fn(p, jnp.asarray(batch["inputs"]))
                logp = jax.nn.log_softmax(logits.astype(jnp.float32))
                nll = -jnp.take_along_axis(logp, jnp.asarray(batch["targets"])[..., None], -1)
                return nll.mean()

            loss, grads = jax.value_and_grad(mean_loss)(params)
            updates, _ = shared.tx.update(grads, opt_state, params)
            return loss, optax.global_norm(grads), optax.apply_updates(params, updates)

        loss, norm, want_params = reference_update(params0, opt0)
        logits = apply_fn(params0, jnp.asarray(batch["inputs"]))
    np_loss = _np_cross_entropy(np.asarray(logits), batch["targets"]).mean()
    assert result["loss"] == pytest.approx(np_loss, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(np_loss / math.log(2), rel=1e-5)
    assert result["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
    assert result["learning_rate"] == pytest.approx(float(shared.learning_rate_fn(0)), rel=1e-7)
    assert float(loss) == pytest.approx(np_loss, rel=1e-5)
    got = jax.device_get(state.params)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want_params), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert int(state.step) == 1


def test_train_step_compiles_once(shared) -> None:
    """After the first step, further steps and evaluations add no compiled programs."""
    config = shared.config
    data = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)
    it = pipeline.TrainIterator(
        data, seq_len=config.seq_len, global_batch_size=config.batch_size, seed=0
    )
    with jax.default_matmul_precision("highest"):  # the context of the other tests
        state = shared.init_state()
        before = jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), state)
        old_leaf = state.params["model"]["embed"]["embedding"]
        state, _ = shared.train_step(state, next(it))
        assert old_leaf.is_deleted()  # the state's buffers were donated
        compiled = shared.p_train_step._cache_size()
        for _ in range(4):
            state, _ = shared.train_step(state, next(it))
        assert shared.p_train_step._cache_size() == compiled == 1
        after = jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), state)
        assert before == after
        assert int(state.step) == 5
        for _ in range(2):
            evaluation.window_eval(
                shared.eval_step, state.params, _eval_batches(config, data[:200])
            )
        assert shared.p_eval_step._cache_size() == 1


def _run_steps(config, steps: int) -> tuple[list[float], list[float], dict]:
    with jax.default_matmul_precision("highest"):
        setup = setup_training(config)
        state = setup.init_state()
        data = np.random.default_rng(5).integers(0, 256, 4000, dtype=np.uint8)
        it = pipeline.TrainIterator(
            data,
            seq_len=config.seq_len,
            global_batch_size=config.batch_size * config.grad_accum_steps,
            seed=3,
        )
        step_losses, norms = [], []
        for _ in range(steps):
            state, m = setup.train_step(state, next(it))
            r = jax.device_get(m.compute())
            step_losses.append(float(r["loss"]))
            norms.append(float(r["grad_norm"]))
    return step_losses, norms, jax.device_get(state.params)


def test_gradient_accumulation_gives_the_same_updates() -> None:
    """Effective batch 8 as 8 rows x 1 and as 2 rows x 4 micro-batches: same updates."""
    base = _run_steps(tu.tiny_config(batch_size=8, grad_accum_steps=1), 3)
    other = _run_steps(tu.tiny_config(batch_size=2, grad_accum_steps=4), 3)
    np.testing.assert_allclose(other[0], base[0], rtol=1e-5)
    np.testing.assert_allclose(other[1], base[1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(other[2]), jax.tree.leaves(base[2]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)


@pytest.mark.slow
def test_gradient_accumulation_four_by_two() -> None:
    base = _run_steps(tu.tiny_config(batch_size=8, grad_accum_steps=1), 3)
    other = _run_steps(tu.tiny_config(batch_size=4, grad_accum_steps=2), 3)
    np.testing.assert_allclose(other[0], base[0], rtol=1e-5)
    np.testing.assert_allclose(other[1], base[1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(other[2]), jax.tree.leaves(base[2]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)


# ------------------------------------------------------------------------------ evaluation
def test_evaluate_matches_per_window_float64_oracle(shared, apply_fn) -> None:
    """Padded eval batches give the mean NLL over every target byte of the split."""
    config = shared.config
    state = shared.init_state()
    data = np.random.default_rng(2).integers(0, 256, 16 * 5 + 7, dtype=np.uint8)
    with jax.default_matmul_precision("highest"):
        got = evaluation.window_eval(shared.eval_step, state.params, _eval_batches(config, data))
        params = jax.device_get(state.params)
        nll = []
        for start in range(0, len(data) - 1, 16):
            window = data[start : start + 17].astype(np.int32)
            # Full windows share one compiled shape; the short last one is its own call.
            logits = apply_fn(params, jnp.asarray(window[None, :-1]))
            nll.append(_np_cross_entropy(np.asarray(logits)[0], window[1:]))
    nll = np.concatenate(nll)
    assert nll.size == len(data) - 1
    assert got.num_tokens == nll.size
    assert got.loss == pytest.approx(nll.mean(), rel=1e-5)
    assert got.bits_per_byte == pytest.approx(nll.mean() / math.log(2), rel=1e-5)


# -------------------------------------------------------------------------------- sampling
def test_text_sample_is_greedy_continuation_of_the_prompt(shared, apply_fn) -> None:
    state = shared.init_state()
    text = loop.generate_sample(shared, state.params, step=3)
    params = jax.device_get(state.params)
    tokens = [ord("a"), ord("b")] + [0] * 5
    for t in range(2, 7):  # oracle: argmax of a full recomputation, no cache
        logits = apply_fn(params, jnp.asarray([tokens], jnp.int32))
        tokens[t] = int(np.argmax(np.asarray(logits)[0, t - 1]))
    assert text == bytes(tokens).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------- end to end
def _e2e_config(tmp: Path, **overrides):
    data_dir, manual_dir = tu.make_enwik8_dirs(tmp / "data")
    return tu.tiny_config(data={"data_dir": data_dir, "manual_dir": manual_dir}, **overrides)


def test_train_and_evaluate_end_to_end_and_resume(tmp_path: Path, caplog) -> None:
    config = _e2e_config(
        tmp_path,
        num_train_steps=12,
        optimizer={"learning_rate": 1e-2},
        log_every_steps=2,
        eval={"every_steps": 6},
        checkpoint={"every_steps": 6},
        sampling={"every_steps": 6},
        profile={"num_steps": 2, "first_step": 3},
    )
    workdir = tmp_path / "run"
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            start = time.perf_counter()
            state = loop.train_and_evaluate(config, str(workdir))
            wall_time = time.perf_counter() - start
    finally:
        jax.config.update("jax_log_compiles", False)
    assert int(state.step) == 12
    compiles = [r for r in caplog.records if "Compiling" in r.getMessage()]
    assert sum("train_step" in r.getMessage() for r in compiles) == 1, [
        r.getMessage()[:120] for r in compiles
    ]

    loss = tu.read_scalars(workdir, "train_loss")
    assert sorted(loss) == [2, 4, 6, 8, 10, 12]
    assert loss[12] < loss[2] - 0.3  # the loss falls
    for tag in tu.TRAIN_SCALARS:
        values = tu.read_scalars(workdir, tag)
        assert sorted(values) == [2, 4, 6, 8, 10, 12], tag
        assert all(np.isfinite(v) for v in values.values()), tag
    for tag in tu.EVAL_SCALARS:
        assert sorted(tu.read_scalars(workdir, tag)) == [6, 12], tag
    # Each logging window holds log_every_steps train steps, ending at the logged step; the
    # windows time train steps only, so together they fit in the measured wall time.
    step_time = tu.read_scalars(workdir, "seconds_per_step")
    windows = dict(zip(sorted(step_time), np.diff([0, *sorted(step_time)]), strict=True))
    assert set(windows.values()) == {config.log_every_steps}
    assert all(t > 0 for t in step_time.values()), step_time
    train_time = sum(step_time[step] * windows[step] for step in step_time)
    assert train_time <= wall_time, (train_time, wall_time)
    # tokens_per_sec counts every row of every micro-batch.
    tokens_per_step = config.batch_size * config.grad_accum_steps * config.seq_len
    speed = tu.read_scalars(workdir, "tokens_per_sec")
    for step in speed:
        assert speed[step] * step_time[step] == pytest.approx(tokens_per_step, rel=1e-4)
    assert min(tu.read_scalars(workdir, "peak_memory_mb").values()) > 10  # MiB, host RSS on CPU
    expected_params = families.closed_form_parameter_count(config.model)
    assert tu.read_scalars(workdir, "num_params") == {0: expected_params}
    bpb = tu.read_scalars(workdir, "train_bits_per_byte")
    assert bpb[12] == pytest.approx(loss[12] / math.log(2), rel=1e-5)
    samples = tu.read_texts(workdir)
    assert sorted(samples) == [6, 12]
    assert all(s.startswith(config.sampling.prompt) for s in samples.values())
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["12", "6"]
    hparams = tu.read_hparams(workdir)
    assert hparams["seq_len"] == 16 and hparams["model.model_dim"] == 16
    assert hparams["model.compute_dtype"] == "float32"
    assert 12 in tu.read_scalars(workdir, "steps_per_sec")  # ReportProgress
    traces = list((workdir / "plugins" / "profile").rglob("*.xplane.pb"))
    assert traces, "the Profile hook wrote no trace"
    saved = (workdir / "config.json").read_text()
    assert '"num_train_steps": 12' in saved and '"seq_len": 16' in saved

    # Rerunning with more steps resumes from step 12 (no step before 13 is trained again).
    config = dataclasses.replace(config, num_train_steps=14)
    runs_before = len(tu.event_files(workdir))
    state = loop.train_and_evaluate(config, str(workdir))
    assert int(state.step) == 14
    rerun_files = tu.event_files(workdir)[runs_before:]
    assert sorted(tu.read_scalars(workdir, "train_loss", rerun_files)) == [14]
    loss = tu.read_scalars(workdir, "train_loss")
    assert sorted(loss) == [2, 4, 6, 8, 10, 12, 14]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["12", "14", "6"]


def test_fallback_to_bundled_sample_when_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(enwik8, "host_reachable", lambda *a, **k: False)
    data_dir, manual_dir = str(tmp_path / "tfds"), str(tmp_path / "none")
    splits = enwik8.load_enwik8_splits(data_dir, manual_dir, allow_sample_fallback=True)
    assert splits.is_sample
    with zipfile.ZipFile(tu.SAMPLE_ZIP) as zf:
        raw = np.frombuffer(zf.read("enwik8"), np.uint8)
    joined = np.concatenate([splits["train"], splits["validation"], splits["test"]])
    np.testing.assert_array_equal(joined, raw)
    with pytest.raises(enwik8.Enwik8UnavailableError, match=r"enwik8\.zip"):
        enwik8.load_enwik8_splits(data_dir, manual_dir, allow_sample_fallback=False)


def test_state_shardings_follow_logical_rules() -> None:
    setup = setup_training(tu.tiny_config())
    emb = setup.state_shardings.params["model"]["embed"]["embedding"]
    assert tuple(emb.spec) == ("tensor", "fsdp")
    mu = setup.state_shardings.opt_state[1][0].mu["model"]["embed"]["embedding"]
    assert tuple(mu.spec) == ("tensor", "fsdp")
    assert tuple(setup.train_batch_sharding.spec) == (None, ("data", "fsdp"), None)
    boxed = jax.eval_shape(lambda: create_train_state(jax.random.PRNGKey(0), setup.model, setup.tx))
    assert isinstance(boxed.params["model"]["embed"]["embedding"], nn.LogicallyPartitioned)
