"""Activation functions that must match Hugging Face bit for bit."""

import jax.numpy as jnp
from jaxtyping import Array, Float

from .._typing import typecheck


@typecheck
def bloom_gelu(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    r"""BLOOM's tanh-approximated GELU, with its literal constants.

    $$\mathrm{gelu}(x) = \tfrac12 x \left(1 + \tanh\!\left(0.79788456\, x\, (1 + 0.044715\, x^2)\right)\right)$$

    Mirrors `transformers.models.bloom.modeling_bloom.bloom_gelu_forward`. The constant
    0.79788456 is BLOOM's rounding of $\sqrt{2/\pi}$; `jax.nn.gelu(approximate=True)` uses
    the exact value and differs in the last bits, so it is not used here.
    """
    return x * 0.5 * (1.0 + jnp.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x)))
