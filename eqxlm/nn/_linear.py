"""Helpers around `eqx.nn.Linear`, which eqxlm uses for every projection.

`eqx.nn.Linear` stores its weight `(out, in)`, exactly as torch's `nn.Linear`, so
checkpoint tensors load without a transpose.
"""

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from .._typing import typecheck


def make_linear(in_features: int, out_features: int, use_bias: bool, dtype, key: PRNGKeyArray) -> eqx.nn.Linear:
    """An `eqx.nn.Linear` (equinox's default initialisation; models re-initialise)."""
    return eqx.nn.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, key=key)


@typecheck
def linear(layer: eqx.Module, x: Float[Array, "seq in_features"]) -> Float[Array, "seq out_features"]:
    """Apply `layer` to every token of `x` (`jax.vmap(layer)(x)`); a wrapper that takes the
    whole sequence (an `eqxlm.inspect` hook) says so with `sequence_wise = True`."""
    return layer(x) if getattr(layer, "sequence_wise", False) else jax.vmap(layer)(x)
