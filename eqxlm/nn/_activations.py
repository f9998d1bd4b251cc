"""Activation functions by their Hugging Face names (`hidden_act`), each as transformers computes it.

Two kinds, and the difference shows in bfloat16 and float16:

- torch **kernels** (`silu`, `gelu`, `gelu(approximate="tanh")`, `relu`) evaluate in float32
  and round once to the input dtype (torch's `opmath` for reduced floats, on CPU and GPU);
  eqxlm does the same with [`in_float32`][];
- transformers' **Python formulas** (`gelu_new`, `gelu_fast`, BLOOM's GELU) run op by op in
  the input dtype, each op rounding; eqxlm writes the same formula in the same order.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._typing import typecheck


def in_float32(fn: Callable) -> Callable:
    """`fn` evaluated in float32 and cast back to the input's dtype (a no-op for float32),
    as torch's element-wise kernels compute reduced-precision inputs."""

    def wrapped(x):
        if jnp.finfo(x.dtype).bits >= 32:
            return fn(x)
        return fn(x.astype(jnp.float32)).astype(x.dtype)

    wrapped.__name__ = wrapped.__qualname__ = getattr(fn, "__name__", "activation")
    wrapped.__doc__ = fn.__doc__
    return wrapped


@typecheck
def silu(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    r"""torch's `silu` (HF `silu`/`swish`): $x\,\sigma(x)$, in float32 then cast back."""
    return in_float32(jax.nn.silu)(x)


@typecheck
def bloom_gelu(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    r"""BLOOM's tanh-approximated GELU, with its literal constants.

    $$\mathrm{gelu}(x) = \tfrac12 x \left(1 + \tanh\!\left(0.79788456\, x\, (1 + 0.044715\, x^2)\right)\right)$$

    Mirrors `transformers.models.bloom.modeling_bloom.bloom_gelu_forward`. The constant
    0.79788456 is BLOOM's rounding of $\sqrt{2/\pi}$; `jax.nn.gelu(approximate=True)` uses
    the exact value and differs in the last bits, so it is not used here.
    """
    return x * 0.5 * (1.0 + jnp.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x)))


@typecheck
def gelu_new(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    r"""GPT-2's `gelu_new` (`NewGELUActivation`): $\tfrac12 x (1 + \tanh(\sqrt{2/\pi}(x + 0.044715 x^3)))$."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


@typecheck
def gelu_exact(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """The exact (erf) GELU, torch's `nn.functional.gelu` (HF `gelu`), in float32 then cast back."""
    return in_float32(lambda y: jax.nn.gelu(y, approximate=False))(x)


@typecheck
def gelu_tanh(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """torch's `gelu(approximate="tanh")` (HF `gelu_pytorch_tanh`, Gemma's `hidden_activation`),
    in float32 then cast back."""
    return in_float32(lambda y: jax.nn.gelu(y, approximate=True))(x)


@typecheck
def gelu_fast(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    r"""HF `gelu_fast`: $\tfrac12 x (1 + \tanh(0.7978845608\, x (1 + 0.044715 x^2)))$."""
    return 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


#: `hidden_act` names eqxlm implements, each matching transformers' `ACT2FN` entry.
ACTIVATIONS = {
    "silu": silu,
    "swish": silu,
    "gelu": gelu_exact,
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_fast,
    "relu": jax.nn.relu,
    "bloom_gelu": bloom_gelu,
}
