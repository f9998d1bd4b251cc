"""Projections: `eqx.nn.Linear`, which eqxlm uses for every projection, applied with
torch's arithmetic for reduced floats.

`eqx.nn.Linear` stores its weight `(out, in)`, exactly as torch's `nn.Linear`, so
checkpoint tensors load without a transpose.

**Precision.** torch multiplies bfloat16 and float16 matrices with float32 accumulation
and rounds once, after adding the bias in float32 (`F.linear` on CPU: bitwise equal to
[`project`][] here, `tests/test_bf16_parity.py`). A plain `w @ x` in bfloat16 asks XLA
for a bfloat16 result and leaves the accumulation to the backend: on XLA:CPU that was
2.3x slower for a 512-token prefill and rounded differently (`benchmarks/NOTES.md`,
bfloat16 on XLA:CPU). [`matmul`][] and [`einsum`][] therefore request float32
accumulation (`preferred_element_type`) and round the result once to the inputs' dtype;
for float32 inputs they are `jnp.matmul` and `jnp.einsum` unchanged.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._typing import typecheck


def make_linear(in_features: int, out_features: int, use_bias: bool, dtype, key: PRNGKeyArray) -> eqx.nn.Linear:
    """An `eqx.nn.Linear` (equinox's default initialisation; models re-initialise)."""
    return eqx.nn.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, key=key)


def accumulator(dtype) -> jnp.dtype:
    """The dtype reduced floats are computed in: float32 (float64 stays float64)."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def matmul(a: Array, b: Array) -> Array:
    """`a @ b` accumulated in (at least) float32, rounded once to `a` and `b`'s common dtype."""
    dtype = jnp.result_type(a, b)
    return jnp.matmul(a, b, preferred_element_type=accumulator(dtype)).astype(dtype)


def einsum(subscripts: str, *operands: Array) -> Array:
    """`jnp.einsum` accumulated in (at least) float32, rounded once to the operands' common dtype."""
    dtype = jnp.result_type(*operands)
    return jnp.einsum(subscripts, *operands, preferred_element_type=accumulator(dtype)).astype(dtype)


def affine(layer: eqx.nn.Linear, x: Array) -> Array:
    """`x @ W.T + b` for one token or a sequence, accumulated in float32 with the bias added
    before the one rounding (torch's `F.linear`)."""
    dtype = jnp.result_type(x, layer.weight)
    y = jnp.matmul(x, layer.weight.T, preferred_element_type=accumulator(dtype))
    if layer.bias is not None:
        y = y + jnp.broadcast_to(layer.bias.astype(y.dtype), y.shape)
    return y.astype(dtype)


def project(layer: eqx.Module, x: Float[Array, " in_features"]) -> Float[Array, " out_features"]:
    """Apply the projection `layer` to one token `x`: a plain `eqx.nn.Linear` (that type
    exactly) with torch's arithmetic (see the module's docstring); any other module (a LoRA
    adapter, a quantized layer, an `eqxlm.inspect` hook, a user's own) is called."""
    return affine(layer, x) if type(layer) is eqx.nn.Linear else layer(x)


@typecheck
def linear(layer: eqx.Module, x: Float[Array, "seq in_features"]) -> Float[Array, "seq out_features"]:
    """Apply `layer` to every token of `x`: a plain `eqx.nn.Linear` as one matrix product
    (as [`project`][]); any other module per token (`jax.vmap(layer)(x)`), or on the whole
    sequence when it says so with `sequence_wise = True` (an `eqxlm.inspect` hook)."""
    if type(layer) is eqx.nn.Linear:
        return affine(layer, x)
    return layer(x) if getattr(layer, "sequence_wise", False) else jax.vmap(layer)(x)
