"""Projections: `eqx.nn.Linear`, which eqxlm uses for every projection, applied with
torch's arithmetic for reduced floats.

`eqx.nn.Linear` stores its weight `(out, in)`, exactly as torch's `nn.Linear`, so
checkpoint tensors load without a transpose.

**Precision.** torch multiplies bfloat16 and float16 matrices with float32 accumulation
and rounds once, after adding the bias in float32 (`F.linear` on CPU: bitwise equal to
[`project`][] here, `tests/test_bf16_parity.py`). A plain `w @ x` in bfloat16 asks XLA
for a bfloat16 result and leaves the accumulation to the backend: on XLA:CPU that was
slower for a prefill and rounded differently (`benchmarks/NOTES.md`, bfloat16 on XLA:CPU).
[`matmul`][] and [`einsum`][] therefore request float32 accumulation
(`preferred_element_type`) and round the result once to the inputs' dtype; for float32
inputs they are `jnp.matmul` and `jnp.einsum` unchanged. Projections choose the product's
form by the number of tokens ([`times_weight`][]).
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._typing import typecheck
from ._taps import each_token


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


def times_weight(x: Array, weight: Array) -> Array:
    """`x @ weight.T` for `x` of shape `(*tokens, in)` and a weight stored `(out, in)`,
    accumulated in float32 (not rounded: [`affine`][] adds the bias first).

    Several tokens (per example: under `jax.vmap` the batch is invisible here) are a
    `dot_general` contracting both operands' last axes, which reads the weight as stored
    (`x @ W.T` copies the transposed weight first): for a bfloat16 sequence the fastest form
    measured, and faster than float32 (NOTES.md, the `matmul_forms.py` table). One token is
    weight-first, `W @ x`: in a vmapped decode step that gave the best whole-model decode at
    batch 1 and 8 of the forms tried (NOTES.md, bfloat16 on XLA:CPU). Every form is the same sum: they differ by
    float32 rounding at most."""
    dtype = jnp.result_type(x, weight)
    acc = accumulator(dtype)
    if math.prod(x.shape[:-1]) <= 1:  # weight-first: what XLA:CPU runs best in a vmapped decode step
        column = x.reshape(-1, x.shape[-1]).T
        return jnp.matmul(weight, column, preferred_element_type=acc).T.reshape(*x.shape[:-1], weight.shape[0])
    return jax.lax.dot_general(x, weight, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=acc)


def affine(layer: eqx.nn.Linear, x: Array) -> Array:
    """`x @ W.T + b` for `x` of shape `(*tokens, in)` ([`times_weight`][]), the bias added in
    float32 before the one rounding (torch's `F.linear`)."""
    dtype = jnp.result_type(x, layer.weight)
    y = times_weight(x, layer.weight)
    if layer.bias is not None:
        y = y + jnp.broadcast_to(layer.bias.astype(y.dtype), y.shape)
    return y.astype(dtype)


def project(layer: eqx.Module, x: Float[Array, "*tokens in_features"]) -> Float[Array, "*tokens out_features"]:
    """Apply the projection `layer` to every token of `x` (one token, a sequence, any leading
    axes): a plain `eqx.nn.Linear` (that type exactly) as one product with torch's arithmetic
    (see the module's docstring); any other module (a quantized layer, a user's own) one token
    at a time, or whole if it says so: an `eqxlm.nn.AbstractTokenAxes` (a LoRA adapter) or an
    `eqxlm.nn.AbstractSequenceWise` (an `eqxlm.inspect` hook); see `eqxlm.nn._taps.each_token`."""
    return affine(layer, x) if type(layer) is eqx.nn.Linear else each_token(layer, x)


@typecheck
def linear(layer: eqx.Module, x: Float[Array, "seq in_features"]) -> Float[Array, "seq out_features"]:
    """[`project`][] for a sequence (shape-checked as one)."""
    return project(layer, x)
