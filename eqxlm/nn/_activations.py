"""Activation functions by their Hugging Face names (`hidden_act`), each as transformers computes it.

Two kinds, and the difference shows in bfloat16 and float16:

- torch **kernels** (`silu`, `gelu`, `gelu(approximate="tanh")`, `relu`) evaluate in float32
  and round once to the input dtype (torch's `opmath` for reduced floats, on CPU and GPU);
  eqxlm does the same with [`in_float32`][];
- transformers' **Python formulas** (`gelu_new`, `gelu_fast`, BLOOM's GELU, `quick_gelu`,
  `gelu_python`, `laplace`, ...) run op by op, each op computed in float32 (its Python scalars
  as float32, not rounded to the tensor's dtype) and rounded to the input dtype; eqxlm writes the
  same formula in the same order through `op_by_op`.

Every one-line entry of transformers' `ACT2CLS` is here; `prelu` and `xielu` carry learned
parameters (checkpoint tensors of their own) and are refused, by name, with the rest.
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


def op_by_op(fn: Callable) -> Callable:
    """`fn(x, r)` evaluated in float32, where `r` rounds an intermediate to the input's dtype:
    a transformers formula on a reduced-precision torch tensor computes each op in float32 (its
    Python scalars as float32) and rounds the result, so `fn` applies `r` to every op's result
    (a no-op for float32)."""

    def wrapped(x):
        if jnp.finfo(x.dtype).bits >= 32:
            return fn(x, lambda y: y)
        return fn(x.astype(jnp.float32), lambda y: y.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)

    wrapped.__name__ = wrapped.__qualname__ = getattr(fn, "__name__", "activation")
    wrapped.__doc__ = fn.__doc__
    return wrapped


def _softplus(x):
    """torch's `softplus` (beta 1, threshold 20): `x` above 20, else `log1p(exp(x))` (the
    exponent clamped so that neither branch overflows into a NaN gradient)."""
    return jnp.where(x > 20, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


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
    return op_by_op(lambda y, r: _fast_tanh_formula(y, r, 0.79788456))(x)


def _fast_tanh_formula(y, r, c: float):
    """`0.5 * x * (1 + tanh(c * x * (1 + 0.044715 * x * x)))`, op by op in transformers' order
    (`gelu_fast`, BLOOM's GELU)."""
    inner = r(r(c * y) * r(1.0 + r(r(0.044715 * y) * y)))
    return r(r(0.5 * y) * r(1.0 + r(jnp.tanh(inner))))


@typecheck
def gelu_new(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    r"""GPT-2's `gelu_new` (`NewGELUActivation`): $\tfrac12 x (1 + \tanh(\sqrt{2/\pi}(x + 0.044715 x^3)))$,
    op by op; the same ops as HF `gelu_accurate` and `gelu_python_tanh`."""

    def formula(y, r):
        inner = r(math.sqrt(2.0 / math.pi) * r(y + r(0.044715 * r(y * y * y))))
        return r(r(0.5 * y) * r(1.0 + r(jnp.tanh(inner))))

    return op_by_op(formula)(x)


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
    return op_by_op(lambda y, r: _fast_tanh_formula(y, r, 0.7978845608))(x)


@typecheck
def quick_gelu(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    r"""HF `quick_gelu` (`QuickGELUActivation`): $x\,\sigma(1.702\,x)$, op by op."""
    return op_by_op(lambda y, r: r(y * r(jax.nn.sigmoid(r(1.702 * y)))))(x)


@typecheck
def gelu_10(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """HF `gelu_10` (`ClippedGELUActivation(-10, 10)`): the exact GELU clipped to [-10, 10]."""
    return jnp.clip(gelu_exact(x), -10.0, 10.0)


@typecheck
def gelu_python(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    r"""HF `gelu_python` (`GELUActivation._gelu_python`): $x \cdot 0.5 (1 + \mathrm{erf}(x / \sqrt 2))$, op by op."""
    return op_by_op(lambda y, r: r(r(y * 0.5) * r(1.0 + r(jax.lax.erf(r(y / math.sqrt(2.0)))))))(x)


@typecheck
def laplace(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    r"""HF `laplace` (`LaplaceActivation`, MEGA): $0.5 (1 + \mathrm{erf}((x - \mu) / (\sigma \sqrt 2)))$
    with $\mu = 0.707107$, $\sigma = 0.282095$, op by op."""
    return op_by_op(lambda y, r: r(0.5 * r(1.0 + r(jax.lax.erf(r(r(y - 0.707107) / (0.282095 * math.sqrt(2.0))))))))(x)


@typecheck
def relu2(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """HF `relu2` (`ReLUSquaredActivation`): `relu(x) ** 2`."""
    return in_float32(lambda y: jnp.square(jax.nn.relu(y)))(x)


@typecheck
def mish(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """torch's `mish` (HF `mish`): `x * tanh(softplus(x))`, in float32 then cast back."""
    return in_float32(lambda y: y * jnp.tanh(_softplus(y)))(x)  # above 20, tanh(log1p(exp(x))) is 1.0 in float32


@typecheck
def sqrtsoftplus(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """HF `sqrtsoftplus` (`SqrtSoftplusActivation`): `sqrt(softplus(x))`, two torch kernels."""
    return op_by_op(lambda y, r: r(jnp.sqrt(r(_softplus(y)))))(x)


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
    "quick_gelu": quick_gelu,
    "gelu_10": gelu_10,
    "gelu_python": gelu_python,
    "gelu_python_tanh": gelu_new,  # input * 0.5 * ...: the same ops (a product with 0.5 is exact)
    "gelu_accurate": gelu_new,
    "laplace": laplace,
    "relu2": relu2,
    "mish": mish,
    "sqrtsoftplus": sqrtsoftplus,
    "hardswish": in_float32(jax.nn.hard_swish),
    "leaky_relu": in_float32(lambda y: jnp.where(y > 0, y, y * 0.01)),
    "relu6": in_float32(jax.nn.relu6),
    "sigmoid": in_float32(jax.nn.sigmoid),
    "tanh": in_float32(jnp.tanh),
    "linear": lambda x: x,
}
#: `ACT2CLS` names refused, with why (the rest of transformers' list is in `ACTIVATIONS`).
REFUSED_ACTIVATIONS = {
    "prelu": "torch's PReLU has a learned slope (a checkpoint tensor eqxlm's MLPs do not carry)",
    "xielu": "xIELU has learned parameters (alpha_p, alpha_n: checkpoint tensors eqxlm's MLPs do not carry)",
}


class UnsupportedActivation(ValueError):
    """An activation name eqxlm does not implement (the config names its own field)."""


def activation(name: str) -> Callable:
    """The function of activation `name` (an `ACTIVATIONS` key); any other name is an
    `UnsupportedActivation` saying why and what is supported."""
    if name in ACTIVATIONS:
        return ACTIVATIONS[name]
    why = REFUSED_ACTIVATIONS.get(name, "not one of transformers' ACT2FN names eqxlm implements")
    raise UnsupportedActivation(f"activation {name!r} is not supported by eqxlm ({why}; supported: {', '.join(ACTIVATIONS)}).")
