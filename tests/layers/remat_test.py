"""What the remat policies keep: the tagged CEMA spectra and attention probabilities."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from megalodon_flax.layers import remat
from megalodon_flax.layers.attention import masked_attention
from megalodon_flax.megalodon.cema import causal_convolution, fft_length


def _saved(capsys: pytest.CaptureFixture, fn, *args) -> list[str]:
    """The residuals `jax.checkpoint`'s policy keeps for the backward pass of fn(*args)."""
    capsys.readouterr()
    print_saved_residuals(fn, *args)
    return capsys.readouterr().out.strip().splitlines()


def _checkpointed(fn, policy: str):
    return jax.checkpoint(lambda *a: jnp.sum(jnp.sin(fn(*a))), policy=remat.REMAT_POLICIES[policy])


def test_spectra_policy_keeps_the_cema_spectra_instead_of_recomputing_the_ffts(
    capsys: pytest.CaptureFixture,
) -> None:
    """With "save_dots_spectra_probs" the backward pass of the FFT convolution reads the
    saved spectra of the input (B, D, n_fft/2 + 1) and the kernel (D, n_fft/2 + 1), real and
    imaginary parts; "save_dots_no_batch" keeps only the arguments (and recomputes them)."""
    x = jnp.ones((2, 3, 8))
    kernel = jnp.ones((3, 8))
    bins = fft_length(8) // 2 + 1
    kept = _saved(capsys, _checkpointed(causal_convolution, "save_dots_spectra_probs"), x, kernel)
    spectra = [line for line in kept if "cema_spectrum" in line]
    kernel_spectra = [line for line in kept if "cema_kernel_spectrum" in line]
    assert len(spectra) == 2 and all(s.startswith(f"f32[2,3,{bins}]") for s in spectra)
    assert len(kernel_spectra) == 2
    assert all(s.startswith(f"f32[3,{bins}]") for s in kernel_spectra)
    plain = _saved(capsys, _checkpointed(causal_convolution, "save_dots_no_batch"), x, kernel)
    assert not any("spectrum" in line for line in plain)
    assert len(plain) == 2  # the two arguments


def test_spectra_policy_keeps_the_attention_probabilities(
    capsys: pytest.CaptureFixture,
) -> None:
    """The softmax is not recomputed: the (B, H, Lq, Lk) probabilities are kept."""
    q = jnp.ones((2, 4, 3, 8))
    allowed = jnp.tril(jnp.ones((4, 4), bool))

    def attention(q, k, v):
        return masked_attention(q, k, v, allowed)

    kept = _saved(capsys, _checkpointed(attention, "save_dots_spectra_probs"), q, q, q)
    probs = [line for line in kept if remat.ATTENTION_PROBS in line]
    assert len(probs) == 1 and probs[0].startswith("f32[2,3,4,4]")
    plain = _saved(capsys, _checkpointed(attention, "save_dots_no_batch"), q, q, q)
    assert not any(remat.ATTENTION_PROBS in line for line in plain)


@pytest.mark.parametrize(
    "policy", [name for name, policy in remat.REMAT_POLICIES.items() if policy is not None]
)
def test_every_policy_gives_the_convolution_gradient_of_autodiff(policy: str) -> None:
    """Whatever a policy keeps, the gradient is that of the function without remat (1e-6)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 3, 11)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 11)), jnp.float32)

    def loss(x, kernel):
        return jnp.sum(jnp.sin(causal_convolution(x, kernel)))

    want = jax.grad(loss, argnums=(0, 1))(x, kernel)
    got = jax.grad(_checkpointed(causal_convolution, policy), argnums=(0, 1))(x, kernel)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


def test_unknown_policy_is_refused_with_the_known_names() -> None:
    with pytest.raises(ValueError, match="save_dots_spectra_probs"):
        remat.rematted(object, "save_everything", static_argnums=())
