"""Position-wise feed-forward blocks."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._typing import typecheck
from ._activations import bloom_gelu
from ._linear import make_linear


class GatedMLP(eqx.Module):
    r"""The gated feed-forward block of Llama and Mistral (SwiGLU with SiLU).

    $$\mathrm{mlp}(x) = W_{down}\,\big(\mathrm{act}(W_{gate} x) \odot W_{up} x\big)$$

    Mirrors `LlamaMLP` / `MistralMLP`; biases only with Llama's `mlp_bias`.
    Takes one token; `jax.vmap` over a sequence.
    """

    gate_proj: eqx.nn.Linear
    up_proj: eqx.nn.Linear
    down_proj: eqx.nn.Linear
    activation: Callable = eqx.field(static=True)

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        use_bias: bool = False,
        activation: Callable = jax.nn.silu,
        dtype=jnp.float32,
        key: PRNGKeyArray,
    ):
        """**Arguments:** `hidden_size`, `intermediate_size`, `use_bias`, `activation`
        (default SiLU, HF `hidden_act="silu"`), `dtype`, `key`."""
        k1, k2, k3 = jax.random.split(key, 3)
        self.gate_proj = make_linear(hidden_size, intermediate_size, use_bias, dtype, k1)
        self.up_proj = make_linear(hidden_size, intermediate_size, use_bias, dtype, k2)
        self.down_proj = make_linear(intermediate_size, hidden_size, use_bias, dtype, k3)
        self.activation = activation

    @typecheck
    def __call__(self, x: Float[Array, " hidden"]) -> Float[Array, " hidden"]:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))


class BloomMLP(eqx.Module):
    r"""BLOOM's feed-forward block: $W_{4h \to h}\,\mathrm{gelu}(W_{h \to 4h} x + b) + b$.

    Both projections have biases; the activation is [`bloom_gelu`][]. Mirrors
    `BloomMLP` (without its residual add, which the block does). One token at a time.
    """

    dense_h_to_4h: eqx.nn.Linear
    dense_4h_to_h: eqx.nn.Linear

    def __init__(self, hidden_size: int, *, intermediate_size: int | None = None, dtype=jnp.float32, key: PRNGKeyArray):
        """**Arguments:** `hidden_size`; `intermediate_size` (default `4 * hidden_size`); `dtype`; `key`."""
        intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
        k1, k2 = jax.random.split(key)
        self.dense_h_to_4h = make_linear(hidden_size, intermediate_size, True, dtype, k1)
        self.dense_4h_to_h = make_linear(intermediate_size, hidden_size, True, dtype, k2)

    @typecheck
    def __call__(self, x: Float[Array, " hidden"]) -> Float[Array, " hidden"]:
        return self.dense_4h_to_h(bloom_gelu(self.dense_h_to_4h(x)))
