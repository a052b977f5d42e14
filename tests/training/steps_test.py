"""Tests of the compiled train and eval steps (megalodon_flax.training.steps via
`setup_training`): one AdamW step, gradient accumulation, windowed evaluation, greedy samples.

Oracles: a second path through plain `jax.grad` of the mean loss with the optimizer applied
by hand, float64 NumPy cross-entropy per window (`tests/reference/losses.py`), the same
effective batch without accumulation, and the argmax of a full recomputation for sampling.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from megalodon_flax import evaluation
from megalodon_flax.data import packing, pipeline
from megalodon_flax.training import loop
from megalodon_flax.training.setup import TrainingSetup, setup_training
from tests.factories import tiny_train_config
from tests.reference import losses


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


# ------------------------------------------------------------------------------ train step
@pytest.fixture(scope="module")
def shared() -> TrainingSetup:
    """One compiled setup reused by the step, evaluation and sampling tests."""
    config = tiny_train_config(
        optimizer={"weight_decay": 0.1, "grad_clip_norm": 0.5, "learning_rate": 3e-3},
        eval={"batch_size": 4, "num_batches": -1},
        sampling={"temperature": 0.0, "prompt": "ab", "length": 5},
    )
    with jax.default_matmul_precision("highest"):
        return setup_training(config)


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
    np_loss = losses.cross_entropy(np.asarray(logits), batch["targets"]).mean()
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


@contextlib.contextmanager
def _backend_compiles():
    """Collects the programs compiled or fetched from the persistent compilation cache inside
    the block (JAX's monitoring events; unlike a jitted function's cache size, not affected by
    the global cache's evictions)."""
    events: list[str] = []
    active = [True]

    def compiled(event: str, duration: float, **_: object) -> None:
        if active[0] and event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    def fetched(event: str, **_: object) -> None:
        if active[0] and event == "/jax/compilation_cache/cache_hits":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(compiled)
    jax.monitoring.register_event_listener(fetched)
    try:
        yield events
    finally:
        active[0] = False


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
        with _backend_compiles() as compiles:
            for _ in range(4):
                state, _ = shared.train_step(state, next(it))
        assert compiles == []
        after = jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), state)
        assert before == after
        assert int(state.step) == 5
        evaluation.window_eval(shared.eval_step, state.params, _eval_batches(config, data[:200]))
        with _backend_compiles() as second_eval:
            evaluation.window_eval(
                shared.eval_step, state.params, _eval_batches(config, data[:200])
            )
        assert second_eval == []
        with _backend_compiles() as fresh:  # the listener does see compilations
            jax.jit(lambda x: x * 3.0 + 1.0)(jnp.ones(7))
        assert fresh


# Adam scales each update to about the learning rate (1e-2 here), so a parameter whose
# gradient is near zero moves by an amount that rounding (the micro-batches compile to other
# summation orders) can change by ~1e-3 of a step; a wrong accumulation moves it by ~a step.
PARAM_ATOL = 5e-5


def _run_steps(config, steps: int, packed: bool = False) -> tuple[list[float], list[float], dict]:
    with jax.default_matmul_precision("highest"):
        setup = setup_training(config)
        state = setup.init_state()
        data = np.random.default_rng(5).integers(0, 256, 4000, dtype=np.uint8)
        rows = dict(
            seq_len=config.seq_len,
            global_batch_size=config.batch_size * config.grad_accum_steps,
            seed=3,
        )
        if packed:  # documents of 1-40 bytes: several runs per row
            cuts = np.cumsum(np.random.default_rng(6).integers(1, 41, 200))
            docs = [bytes(d) for d in np.split(data, cuts[cuts < data.size]) if d.size]
            it = packing.PackedTrainIterator(docs, prefetch=0, **rows)
        else:
            it = pipeline.TrainIterator(data, **rows)
        step_losses, norms = [], []
        for _ in range(steps):
            state, m = setup.train_step(state, next(it))
            r = jax.device_get(m.compute())
            step_losses.append(float(r["loss"]))
            norms.append(float(r["grad_norm"]))
    return step_losses, norms, jax.device_get(state.params)


def test_gradient_accumulation_gives_the_same_updates() -> None:
    """Effective batch 8 as 8 rows x 1 and as 2 rows x 4 micro-batches: same updates."""
    base = _run_steps(tiny_train_config(batch_size=8, grad_accum_steps=1), 3)
    other = _run_steps(tiny_train_config(batch_size=2, grad_accum_steps=4), 3)
    np.testing.assert_allclose(other[0], base[0], rtol=1e-5)
    np.testing.assert_allclose(other[1], base[1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(other[2]), jax.tree.leaves(base[2]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=PARAM_ATOL)


@pytest.mark.slow
def test_gradient_accumulation_four_by_two() -> None:
    base = _run_steps(tiny_train_config(batch_size=8, grad_accum_steps=1), 3)
    other = _run_steps(tiny_train_config(batch_size=4, grad_accum_steps=2), 3)
    np.testing.assert_allclose(other[0], base[0], rtol=1e-5)
    np.testing.assert_allclose(other[1], base[1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(other[2]), jax.tree.leaves(base[2]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=PARAM_ATOL)


@pytest.mark.slow
def test_gradient_accumulation_of_packed_rows_gives_the_same_updates() -> None:
    """Packed rows (segment ids, zero weights at document starts) split into micro-batches
    update as the whole batch does."""
    base = _run_steps(tiny_train_config(batch_size=8, grad_accum_steps=1), 3, packed=True)
    other = _run_steps(tiny_train_config(batch_size=2, grad_accum_steps=4), 3, packed=True)
    np.testing.assert_allclose(other[0], base[0], rtol=1e-5)
    np.testing.assert_allclose(other[1], base[1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(other[2]), jax.tree.leaves(base[2]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=PARAM_ATOL)


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
            nll.append(losses.cross_entropy(np.asarray(logits)[0], window[1:]))
    nll = np.concatenate(nll)
    assert nll.size == len(data) - 1
    assert got.num_tokens == nll.size
    assert got.loss == pytest.approx(nll.mean(), rel=1e-5)
    assert got.bits_per_byte == pytest.approx(nll.mean() / math.log(2), rel=1e-5)


def test_evaluation_of_concatenated_documents_reads_each_alone(shared, apply_fn) -> None:
    """Held-out documents one after another, with their segment ids: the evaluated NLL is
    that of each document run alone from a fresh state (their first tokens unscored),
    windows cutting documents included."""
    config = shared.config
    state = shared.init_state()
    rng = np.random.default_rng(8)
    docs = [rng.integers(0, 256, n).astype(np.uint8) for n in (5, 14, 1, 9, 30, 4)]
    data = np.concatenate(docs)
    ids = np.repeat(np.arange(1, len(docs) + 1), [d.size for d in docs])
    batches = pipeline.eval_batches(
        data, seq_len=config.seq_len, global_batch_size=config.eval.batch_size, segment_ids=ids
    )
    with jax.default_matmul_precision("highest"):
        got = evaluation.window_eval(shared.eval_step, state.params, batches)
        params = jax.device_get(state.params)
        nll = []
        # Oracle: every piece of a document inside one 16-token window, run alone.
        for start in range(0, data.size - 1, 16):
            window = slice(start, min(start + 17, data.size))
            for doc in np.unique(ids[window]):
                piece = data[window][ids[window] == doc].astype(np.int32)
                if piece.size > 1:
                    logits = apply_fn(params, jnp.asarray(piece[None, :-1]))
                    nll.append(losses.cross_entropy(np.asarray(logits)[0], piece[1:]))
    nll = np.concatenate(nll)
    assert got.num_tokens == nll.size == data.size - len(docs)  # no pair across documents
    assert got.loss == pytest.approx(nll.mean(), rel=1e-5)


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
