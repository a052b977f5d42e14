"""The Flax module owning one layer's CEMA parameters (spec §3.1); the math is in `cema`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from megalodon_flax.layers import initializers
from megalodon_flax.layers.segments import Segments
from megalodon_flax.megalodon import context_parallel
from megalodon_flax.megalodon.cema import cema
from megalodon_flax.megalodon.cema_powers import cema_coefficients


class CEMA(nn.Module):
    """Flax module owning the CEMA parameters of one layer (spec §3.1).

    Attributes:
      ndim: order N (complex components per channel).
      block: lags per block when building powers q^j.
    """

    ndim: int
    block: int = 4096

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        state: jax.Array | None = None,
        path: str = "fft",
        return_state: bool = False,
        split: context_parallel.ContextSplit | None = None,
        segments: Segments | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """x (B, L, D) any float dtype → (y (B, L, D) same dtype, state (B, D, N) complex64|None).

        `mask` (B, L) marks valid tokens; masked inputs are replaced by 0 before the recurrence
        (the state still decays through them). `split`, `segments`: see `cema`; with
        `segments` the padding (segment 0) inputs are zeroed as well.
        """
        dim = x.shape[-1]
        n = self.ndim
        f32 = jnp.float32
        alpha = self.param(
            "alpha",
            nn.with_logical_partitioning(initializers.normal(0.2), ("embed", "cema", None)),
            (dim, n, 1),
            f32,
        )
        delta = self.param(
            "delta",
            nn.with_logical_partitioning(initializers.normal(0.2), ("embed", "cema", None)),
            (dim, n, 1),
            f32,
        )
        theta = self.param(
            "theta",
            nn.with_logical_partitioning(initializers.cema_theta, ("embed", None, None)),
            (dim, 1, 1),
            f32,
        )
        gamma_real = self.param(
            "gamma_real",
            nn.with_logical_partitioning(initializers.normal(1.0), ("embed", "cema")),
            (dim, n),
            f32,
        )
        gamma_imag = self.param(
            "gamma_imag",
            nn.with_logical_partitioning(initializers.zeros, ("embed", "cema")),
            (dim, n),
            f32,
        )
        omega = self.param(
            "omega",
            nn.with_logical_partitioning(initializers.truncated_normal(0.25, 4.0), ("embed",)),
            (dim,),
            f32,
        )
        coeffs = cema_coefficients(alpha, delta, theta, gamma_real, gamma_imag)
        x32 = x.astype(f32)
        if segments is not None:
            mask = segments.valid
        if mask is not None:
            x32 = jnp.where(mask[..., None], x32, 0.0)
        # Channels whole on every device: left to propagation, a tensor-parallel mesh split
        # them, and with scanned layers XLA's CPU layout assignment then handed the FFT a
        # transposed operand that its runtime refuses (fft_thunk RET_CHECK).
        x32 = nn.with_logical_constraint(x32, ("batch", "length", "act_embed"))
        y, new_state = cema(
            coeffs,
            omega,
            jnp.swapaxes(x32, 1, 2),
            state,
            path=path,
            return_state=return_state,
            block=self.block,
            split=split,
            segments=segments,
        )
        y = nn.with_logical_constraint(jnp.swapaxes(y, 1, 2), ("batch", "length", "act_embed"))
        return y.astype(x.dtype), new_state
