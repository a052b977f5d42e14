"""Tests of CEMA (spec §3) against float64 NumPy oracles: §10 items 1-7, gradients, init.

The oracles (`tests/reference/cema.py`) are a float64 loop over time of the recurrence of §3.3
(complex128 state) and the closed-form kernel K[d, j] = Re Σ_n p γ q^j of §3.4, both computed
from the raw float32 parameters independently of the package.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax.megalodon import cema, cema_layer, cema_powers
from tests.reference import cema as reference

pytestmark = pytest.mark.usefixtures("highest_precision")

D, N, B = 16, 8, 2
PATHS = ("fft", "scan", "sequential")
PARAM_NAMES = ("alpha", "delta", "theta", "gamma_real", "gamma_imag", "omega")

Params = reference.Params


# --------------------------------------------------------------------------- helpers


def _random_params(seed: int, dim: int = D, ndim: int = N) -> Params:
    """Spec §6 draws, plus gamma_imag ~ N(0, 1) so that every term is exercised."""
    rng = np.random.default_rng(seed)
    k = np.arange(1, dim + 1, dtype=np.float64)
    f = dim ** (-k / dim)
    theta = np.log(f / (1.0 - f))[rng.permutation(dim)].reshape(dim, 1, 1)
    omega = rng.normal(0.0, 0.25, dim)
    params = {
        "alpha": rng.normal(0.0, 0.2, (dim, ndim, 1)),
        "delta": rng.normal(0.0, 0.2, (dim, ndim, 1)),
        "theta": theta,
        "gamma_real": rng.normal(0.0, 1.0, (dim, ndim)),
        "gamma_imag": rng.normal(0.0, 1.0, (dim, ndim)),
        "omega": np.clip(omega, -1.0, 1.0),
    }
    return {name: value.astype(np.float32) for name, value in params.items()}


def _random_state(seed: int, batch: int = B, dim: int = D, ndim: int = N) -> np.ndarray:
    """h_init ~ 0.05·CN(0, 1) as complex64."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(batch, dim, ndim)) + 1j * rng.normal(size=(batch, dim, ndim))
    return (0.05 * z / math.sqrt(2.0)).astype(np.complex64)


def _coeffs(params: dict[str, jax.Array]) -> cema.CemaCoefficients:
    return cema_powers.cema_coefficients(*(params[name] for name in PARAM_NAMES[:5]))


@functools.partial(jax.jit, static_argnames=("path",))
def _run(
    params: dict[str, jax.Array], x: jax.Array, h_init: jax.Array | None, path: str
) -> tuple[jax.Array, jax.Array]:
    return cema.cema(_coeffs(params), params["omega"], x, h_init, path=path, return_state=True)


def _call(
    params: Params, x: np.ndarray, path: str, h_init: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    y, state = _run(params, x, h_init, path)
    assert y.dtype == jnp.float32 and state.dtype == jnp.complex64
    return np.asarray(y), np.asarray(state)


def _assert_close(actual, desired, atol: float, rtol: float, what: str = "") -> None:
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(desired), atol=atol, rtol=rtol, err_msg=what
    )


def _inputs(seed: int, length: int, batch: int = B, dim: int = D) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, dim, length)).astype(np.float32)


# --------------------------------------------------------------------------- item 1


@pytest.mark.parametrize("length", [1, 2, 31, 32, 33, 64, 257, 1024, 4099])
def test_fft_matches_sequential_and_oracle(length: int) -> None:
    params = _random_params(0)
    x = _inputs(length, length)
    y_fft, h_fft = _call(params, x, "fft")
    y_seq, h_seq = _call(params, x, "sequential")
    y_ref, states_ref = reference.recurrence(params, x)
    _assert_close(y_fft, y_seq, 1e-5, 1e-5, "fft vs sequential")
    _assert_close(y_fft, y_ref, 1e-5, 1e-5, "fft vs float64")
    _assert_close(y_seq, y_ref, 1e-5, 1e-5, "sequential vs float64")
    # Final states: closed form (fft) and sequential.
    _assert_close(h_fft, states_ref[-1], 2e-6, 2e-5, "closed-form state vs float64")
    _assert_close(h_seq, states_ref[-1], 2e-6, 2e-5, "sequential state vs float64")


def test_kernel_matches_closed_form_and_is_block_independent() -> None:
    params = _random_params(1)
    length = 4099
    coeffs = _coeffs(params)
    k_ref = reference.kernel(params, length)
    k_default = np.asarray(cema.cema_kernel(coeffs, length))
    k_blocked = np.asarray(cema.cema_kernel(coeffs, length, block=1000))
    assert k_default.shape == (D, length) and k_default.dtype == np.float32
    _assert_close(k_default, k_ref, 1e-6, 1e-5, "kernel vs float64 closed form")
    _assert_close(k_blocked, k_ref, 1e-6, 1e-5, "blocked kernel vs float64 closed form")


# --------------------------------------------------------------------------- item 2


@pytest.mark.parametrize(("length", "with_state"), [(257, False), (63, True)])
def test_associative_scan_state_trajectory(length: int, with_state: bool) -> None:
    params = _random_params(2)
    x = _inputs(10 + length, length)
    h_init = _random_state(3) if with_state else None
    y_scan, states = jax.jit(cema.cema_associative_scan)(_coeffs(params), x, h_init)
    states = np.asarray(states)
    assert states.shape == (length, B, D, N) and states.dtype == np.complex64
    y_ref, states_ref = reference.recurrence(params, x, h_init)
    _assert_close(states, states_ref, 2e-6, 2e-5, "scan states vs float64 recurrence")
    # The sequential path's outputs and final state, and the closed-form state of prefixes.
    y_seq, h_seq = _call(params, x, "sequential", h_init)
    omega = params["omega"][:, None]
    _assert_close(np.asarray(y_scan) + omega * x, y_seq, 1e-5, 1e-5, "scan y vs sequential")
    _assert_close(np.asarray(y_scan) + omega * x, y_ref, 1e-5, 1e-5, "scan y vs float64")
    _assert_close(states[-1], h_seq, 2e-6, 2e-5, "scan final state vs sequential")
    prefix = length // 2 + 1
    h_cf = cema.closed_form_state(_coeffs(params), jnp.asarray(x[..., :prefix]), h_init)
    _assert_close(h_cf, states[prefix - 1], 2e-6, 2e-5, "closed-form state of a prefix")


# --------------------------------------------------------------------------- item 3


@pytest.mark.parametrize("length", [1, 33, 63, 257])
def test_initial_state(length: int) -> None:
    params = _random_params(4)
    x = _inputs(20 + length, length)
    h_init = _random_state(5)
    y_ref, states_ref = reference.recurrence(params, x, h_init)
    y_seq, h_seq = _call(params, x, "sequential", h_init)
    y_fft, h_fft = _call(params, x, "fft", h_init)
    _assert_close(y_fft, y_seq, 1e-5, 1e-5, "fft + bias vs sequential")
    _assert_close(h_fft, h_seq, 2e-6, 2e-5, "closed-form final state vs sequential")
    for name, y, h in (("fft", y_fft, h_fft), ("sequential", y_seq, h_seq)):
        _assert_close(y, y_ref, 1e-5, 1e-5, f"{name} vs float64")
        _assert_close(h, states_ref[-1], 2e-6, 2e-5, f"{name} state vs float64")
    # The bias term alone is Re Σ γ h_init q^(t+1).
    _, q, gamma = reference.coefficients(params)
    powers = q[..., None] ** np.arange(1, length + 1)
    bias_ref = np.real(np.einsum("bdn,dnt->bdt", gamma * h_init.astype(np.complex128), powers))
    bias = cema.initial_state_bias(_coeffs(params), jnp.asarray(h_init), length)
    _assert_close(bias, bias_ref, 1e-6, 1e-5, "initial-state bias vs float64")


# --------------------------------------------------------------------------- item 4


@pytest.mark.parametrize("path", PATHS)
def test_split_invariance(path: str) -> None:
    length = 64
    params = _random_params(6)
    x = _inputs(7, length)
    y_full, h_full = _call(params, x, path)
    zero_state = np.zeros((B, D, N), np.complex64)
    for split in (1, 31, 33, length - 1):
        y_a, h_a = _call(params, x[..., :split], path, zero_state)
        y_b, h_b = _call(params, x[..., split:], path, h_a)
        y_joined = np.concatenate([y_a, y_b], axis=-1)
        _assert_close(y_joined, y_full, 1e-5, 1e-4, f"outputs, split at {split}")
        _assert_close(h_b, h_full, 2e-6, 2e-5, f"final state, split at {split}")


# --------------------------------------------------------------------------- item 5


@pytest.mark.parametrize("path", PATHS)
def test_impulse_response(path: str) -> None:
    length = 64
    params = _random_params(8)
    channel = 5
    x = np.zeros((B, D, length), np.float32)
    x[0, channel, 0] = 1.0
    y, _ = _call(params, x, path)
    expected = reference.kernel(params, length)[channel]
    expected[0] += params["omega"][channel]
    _assert_close(y[0, channel], expected, 1e-6, 1e-5, "impulse response vs closed-form K")
    others = np.delete(y[0], channel, axis=0)
    np.testing.assert_array_equal(others, 0.0)
    np.testing.assert_array_equal(y[1], 0.0)
    # Decay bound |K[d,t]| ≤ Σ_n |p γ| |q|^t on every channel.
    p, q, gamma = reference.coefficients(params)
    bound = np.sum(np.abs(p * gamma)[..., None] * np.abs(q)[..., None] ** np.arange(length), 1)
    k = np.asarray(cema.cema_kernel(_coeffs(params), length))
    assert np.all(np.abs(k) <= bound + 1e-6)
    response = y[0, channel] - np.where(np.arange(length) == 0, params["omega"][channel], 0.0)
    assert np.all(np.abs(response) <= bound[channel] + 1e-6)
    assert np.abs(k[:, -8:]).max() < 1e-3 * np.abs(k[:, 0]).max()  # decayed by the end


# --------------------------------------------------------------------------- item 6


def _extreme_params() -> Params:
    """alpha, delta in {±50} (all four sign pairs on every channel), theta = ±50."""
    params = _random_params(9)
    n = np.arange(N)
    sign_alpha = np.where(n % 2 == 0, 1.0, -1.0)
    sign_delta = np.where((n // 2) % 2 == 0, 1.0, -1.0)
    params["alpha"] = np.broadcast_to(50.0 * sign_alpha[None, :, None], (D, N, 1)).astype(
        np.float32
    )
    params["delta"] = np.broadcast_to(50.0 * sign_delta[None, :, None], (D, N, 1)).astype(
        np.float32
    )
    params["theta"] = (
        np.where(np.arange(D) % 2 == 0, 50.0, -50.0).reshape(D, 1, 1).astype(np.float32)
    )
    return params


def test_stability_extreme_parameters() -> None:
    params = _extreme_params()
    coeffs = _coeffs(params)
    mag = np.abs(np.asarray(coeffs.q))
    assert np.all(np.isfinite(np.asarray(coeffs.log_mag)))
    assert mag.max() <= 1.0
    # Strictly inside the unit circle wherever 1 − aδ is representably below 1 in float32
    # (σ(−50) ≈ 2e-22 makes 1 − aδ round to exactly 1 in float32).
    _, q64, _ = reference.coefficients(params)
    representable = np.abs(q64) <= 1.0 - 2.0**-23
    assert representable.any()
    assert np.all(mag[representable] < 1.0)
    np.testing.assert_allclose(mag, np.abs(q64), atol=1e-6)
    length = 63
    x = _inputs(10, length)
    h_init = _random_state(11)
    y_ref, states_ref = reference.recurrence(params, x, h_init)
    for path in PATHS:
        y, h = _call(params, x, path, h_init)
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(h)), path
        scale = np.abs(y_ref).max()
        _assert_close(y, y_ref, 1e-4 * scale, 1e-4, f"{path} vs float64 (extreme params)")
        h_scale = np.abs(states_ref[-1]).max()
        _assert_close(h, states_ref[-1], 1e-4 * h_scale, 1e-4, f"{path} state (extreme)")


# --------------------------------------------------------------------------- item 7


def _module_params(seed: int) -> dict[str, jax.Array]:
    return {name: jnp.asarray(v) for name, v in _random_params(seed).items()}


@functools.partial(jax.jit, static_argnames=("path",))
def _apply_module(
    params: dict[str, jax.Array], x: jax.Array, mask: jax.Array | None, path: str
) -> tuple[jax.Array, jax.Array]:
    return cema_layer.CEMA(ndim=N).apply(
        {"params": params}, x, mask=mask, path=path, return_state=True
    )


@pytest.mark.parametrize("path", PATHS)
def test_mask_ignores_values_at_masked_positions(path: str) -> None:
    length = 40
    rng = np.random.default_rng(14)
    x = rng.normal(size=(B, length, D)).astype(np.float32)
    mask = np.ones((B, length), bool)
    mask[0, -9:] = False  # right padding
    mask[1, [3, 17, 18, 30]] = False  # scattered holes
    params = _module_params(15)
    x_zero = np.where(mask[..., None], x, 0.0).astype(np.float32)
    y_zero, h_zero = _apply_module(params, x_zero, mask, path)
    poison = np.array([np.nan, np.inf, -np.inf, 3e38], np.float32)
    x_bad = np.where(mask[..., None], x, poison[rng.integers(0, 4, x.shape)]).astype(np.float32)
    y_bad, h_bad = _apply_module(params, x_bad, mask, path)
    y_bad, h_bad = np.asarray(y_bad), np.asarray(h_bad)
    assert np.all(np.isfinite(y_bad)) and np.all(np.isfinite(h_bad))
    valid = np.broadcast_to(mask[..., None], x.shape)
    np.testing.assert_array_equal(y_bad[valid], np.asarray(y_zero)[valid])
    np.testing.assert_array_equal(h_bad, np.asarray(h_zero))
    # Against the float64 recurrence on the zero-filled input (channel-major).
    y_ref, states_ref = reference.recurrence(_random_params(15), np.swapaxes(x_zero, 1, 2))
    _assert_close(np.swapaxes(y_bad, 1, 2), y_ref, 1e-5, 1e-5, "module vs float64")
    _assert_close(h_bad, states_ref[-1], 2e-6, 2e-5, "module state vs float64")


# --------------------------------------------------------------------------- gradients


def _loss_weights(
    seed: int, batch: int, dim: int, ndim: int, length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float32 weights of a linear loss on y (B,D,L) and on Re/Im of the final state."""
    rng = np.random.default_rng(seed)
    shapes = ((batch, dim, length), (batch, dim, ndim), (batch, dim, ndim))
    return tuple(rng.normal(size=shape).astype(np.float32) for shape in shapes)


def _jax_loss(args: dict[str, jax.Array], weights, path: str) -> jax.Array:
    w_y, w_re, w_im = weights
    h_init = jax.lax.complex(args["h_re"], args["h_im"])
    y, h = cema.cema(_coeffs(args), args["omega"], args["x"], h_init, path=path, return_state=True)
    return jnp.sum(w_y * y) + jnp.sum(w_re * jnp.real(h)) + jnp.sum(w_im * jnp.imag(h))


def _np_loss(args: dict[str, np.ndarray], weights) -> float:
    w_y, w_re, w_im = weights
    params = {name: args[name] for name in PARAM_NAMES}
    h_init = args["h_re"].astype(np.float64) + 1j * args["h_im"].astype(np.float64)
    y, states = reference.recurrence(params, args["x"], h_init)
    h = states[-1]
    return float(np.sum(w_y * y) + np.sum(w_re * h.real) + np.sum(w_im * h.imag))


def _grad_args(seed: int, batch: int, dim: int, ndim: int, length: int) -> dict[str, np.ndarray]:
    args = dict(_random_params(seed, dim, ndim))
    h = _random_state(seed + 1, batch, dim, ndim)
    args["h_re"] = np.real(h).astype(np.float32)
    args["h_im"] = np.imag(h).astype(np.float32)
    args["x"] = _inputs(seed + 2, length, batch, dim)
    return args


def _finite_differences(
    args: dict[str, np.ndarray], weights, samples: int, seed: int, step: float = 1e-6
) -> dict[str, tuple[tuple[np.ndarray, ...], np.ndarray]]:
    """Central differences of the float64 oracle loss at `samples` random entries per argument.

    Returns, per argument, the sampled indices and the derivative estimates there.
    """
    rng = np.random.default_rng(seed)
    base = {k: v.astype(np.float64) for k, v in args.items()}
    out = {}
    for name, value in base.items():
        flat = rng.choice(value.size, size=min(samples, value.size), replace=False)
        idx = np.unravel_index(flat, value.shape)
        derivs = np.empty(flat.size)
        for i, entry in enumerate(zip(*idx, strict=True)):
            plus, minus = value.copy(), value.copy()
            plus[entry] += step
            minus[entry] -= step
            f_plus = _np_loss({**base, name: plus}, weights)
            f_minus = _np_loss({**base, name: minus}, weights)
            derivs[i] = (f_plus - f_minus) / (2.0 * step)
        out[name] = (idx, derivs)
    return out


@functools.partial(jax.jit, static_argnames=("path",))
def _loss_grads(args: dict[str, jax.Array], weights, path: str) -> dict[str, jax.Array]:
    return jax.grad(_jax_loss)(args, weights, path)


def _jax_grads(args: dict[str, np.ndarray], weights, path: str) -> dict[str, np.ndarray]:
    weights = tuple(jnp.asarray(w, jnp.float32) for w in weights)
    grads = _loss_grads(jax.tree.map(jnp.asarray, args), weights, path)
    return {name: np.asarray(g) for name, g in grads.items()}


GRAD_SHAPE = (B, D, N, 130)  # batch, dim, ndim, length


def test_gradients_across_paths_and_finite_differences() -> None:
    """Gradients w.r.t. every parameter, x and h_init: paths agree; float64 FD agrees."""
    args = _grad_args(16, *GRAD_SHAPE)
    weights = _loss_weights(17, *GRAD_SHAPE)
    grads = {path: _jax_grads(args, weights, path) for path in PATHS}
    for name in args:
        ref = grads["sequential"][name]
        scale = np.abs(ref).max()
        assert scale > 0, name
        for path in ("fft", "scan"):
            _assert_close(grads[path][name], ref, 1e-5 * scale, 1e-4, f"{path} vs seq: {name}")
    fd = _finite_differences(args, weights, samples=12, seed=18)
    for name, (idx, g_ref) in fd.items():
        scale = np.abs(grads["sequential"][name]).max()
        for path in PATHS:
            _assert_close(grads[path][name][idx], g_ref, 1e-5 * scale, 1e-4, f"{path}: FD {name}")


def test_stability_gradients_finite() -> None:
    """Item 6 for gradients: alpha, delta = ±50 give finite gradients on every path."""
    args = _grad_args(20, *GRAD_SHAPE)
    args.update(_extreme_params())
    weights = _loss_weights(21, *GRAD_SHAPE)
    for path in PATHS:
        for name, g in _jax_grads(args, weights, path).items():
            assert np.all(np.isfinite(g)), (path, name)


# --------------------------------------------------------------------------- module


def test_module_parameters_and_init_statistics() -> None:
    dim, ndim = 512, 16
    init = jax.jit(cema_layer.CEMA(ndim=ndim).init)
    x = jnp.zeros((1, 3, dim), jnp.float32)
    variables = nn.unbox(init(jax.random.key(0), x))
    params = variables["params"]
    shapes = {
        "alpha": (dim, ndim, 1),
        "delta": (dim, ndim, 1),
        "theta": (dim, 1, 1),
        "gamma_real": (dim, ndim),
        "gamma_imag": (dim, ndim),
        "omega": (dim,),
    }
    assert set(params) == set(shapes)
    for name, shape in shapes.items():
        assert params[name].shape == shape, name
        assert params[name].dtype == jnp.float32, name
    alpha, delta = np.asarray(params["alpha"]), np.asarray(params["delta"])
    for value in (alpha, delta):
        assert abs(value.std() - 0.2) < 0.2 * 0.04 and abs(value.mean()) < 0.01
    gamma_real = np.asarray(params["gamma_real"])
    assert abs(gamma_real.std() - 1.0) < 0.04 and abs(gamma_real.mean()) < 0.05
    np.testing.assert_array_equal(np.asarray(params["gamma_imag"]), 0.0)
    omega = np.asarray(params["omega"])
    assert np.all(np.abs(omega) <= 1.0)
    assert abs(omega.std() - 0.25) < 0.25 * 0.1
    # σ(theta) is a permutation of {D^(-k/D)}, k = 1..D.
    theta = np.asarray(params["theta"]).reshape(-1)
    freqs = dim ** (-np.arange(1, dim + 1) / dim)
    np.testing.assert_allclose(np.sort(reference.sigmoid(theta)), np.sort(freqs), rtol=1e-5)
    assert not np.all(np.diff(reference.sigmoid(theta)) < 0)  # not left in sorted order
    other = nn.unbox(init(jax.random.key(1), x))["params"]["theta"]
    assert not np.array_equal(np.asarray(other).reshape(-1), theta)


def test_module_bf16_input() -> None:
    length = 40
    params = _module_params(20)
    x = np.random.default_rng(21).normal(size=(B, length, D)).astype(np.float32)
    x_bf16 = jnp.asarray(x, jnp.bfloat16)
    mask = np.ones((B, length), bool)
    for path in PATHS:
        y, h = _apply_module(params, x_bf16, mask, path)
        assert y.dtype == jnp.bfloat16, path
        assert h.dtype == jnp.complex64, path
        y32, h32 = _apply_module(params, x_bf16.astype(jnp.float32), mask, path)
        assert y32.dtype == jnp.float32
        # Same float32 computation, output rounded once to bf16.
        _assert_close(np.asarray(y, np.float32), np.asarray(y32), 1e-6, 2.0**-8, path)
        _assert_close(h, h32, 0.0, 0.0, f"{path}: bf16 state")
