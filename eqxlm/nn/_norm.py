"""Normalisation layers: Mistral/Llama's RMSNorm and BLOOM's LayerNorm."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._typing import typecheck


class RMSNorm(eqx.Module):
    r"""Root-mean-square normalisation, with Hugging Face's Llama/Mistral numerics.

    $$y = w \odot \mathrm{cast}_{x}\!\left(\frac{x_{32}}{\sqrt{\mathrm{mean}(x_{32}^2) + \epsilon}}\right)$$

    The statistics are computed in float32 and the normalised vector is cast back to the
    input dtype **before** the weight multiply, as `LlamaRMSNorm` / `MistralRMSNorm` do.
    (`eqx.nn.RMSNorm` multiplies first and has a bias by default: in bfloat16 the two
    orders round differently.)

    Takes one token vector; use `jax.vmap(norm)(x)` for a sequence.
    """

    weight: Float[Array, " hidden"]
    eps: float = eqx.field(static=True)

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, dtype=jnp.float32):
        """**Arguments:** `hidden_size`; `eps` (HF `rms_norm_eps`); `dtype` of the weight."""
        self.weight = jnp.ones((hidden_size,), dtype)
        self.eps = eps

    @typecheck
    def __call__(self, x: Float[Array, " hidden"]) -> Float[Array, " hidden"]:
        """**Arguments:** `x`, one token. **Returns:** the normalised token, in `x`'s dtype
        promoted with the weight's (as in HF)."""
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32) + self.eps)
        with jax.numpy_dtype_promotion("standard"):  # torch's rule: bf16 x * f32 weight -> f32
            out_dtype = jnp.promote_types(self.weight.dtype, x.dtype)
        return self.weight.astype(out_dtype) * x32.astype(x.dtype).astype(out_dtype)


class LayerNorm(eqx.Module):
    r"""Layer normalisation with a learned scale and bias (BLOOM's `LayerNorm`).

    $$y = w \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + b$$

    with the mean and (biased) variance computed in float32, as PyTorch's CPU kernel
    accumulates, and the result cast back to the input dtype.

    Takes one token vector; use `jax.vmap(norm)(x)` for a sequence.
    """

    weight: Float[Array, " hidden"]
    bias: Float[Array, " hidden"]
    eps: float = eqx.field(static=True)

    def __init__(self, hidden_size: int, eps: float = 1e-5, *, dtype=jnp.float32):
        """**Arguments:** `hidden_size`; `eps` (HF `layer_norm_epsilon`); `dtype` of the weights."""
        self.weight = jnp.ones((hidden_size,), dtype)
        self.bias = jnp.zeros((hidden_size,), dtype)
        self.eps = eps

    @typecheck
    def __call__(self, x: Float[Array, " hidden"]) -> Float[Array, " hidden"]:
        """**Arguments:** `x`, one token. **Returns:** the normalised token, in `x`'s dtype."""
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32)
        centred = x32 - mean
        var = jnp.mean(centred * centred)
        y = centred * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight.astype(jnp.float32) + self.bias.astype(jnp.float32)
        return y.astype(x.dtype)
