"""Normalisation layers: RMSNorm (Llama, Mistral, Gemma, Qwen, OLMo) and LayerNorm (BLOOM, GPT-2, GPT-NeoX)."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._typing import typecheck


class RMSNorm(eqx.Module):
    r"""Root-mean-square normalisation, with Hugging Face's numerics for each family.

    $$y = \mathrm{scale} \odot \frac{x_{32}}{\sqrt{\mathrm{mean}(x_{32}^2) + \epsilon}},
    \qquad \mathrm{scale} = w \text{ or } (1 + w)$$

    The statistics are always computed in float32. Two choices differ between families and
    only show in low precision:

    - `weight_in_float32=False` (Llama, Mistral, Qwen): the normalised vector is cast back to
      the input dtype **before** the weight multiply (`LlamaRMSNorm`);
      `True` (Gemma, OLMo-2): the weight multiply happens in float32 and the product is cast
      (`Gemma2RMSNorm`, `Olmo2RMSNorm`).
    - `unit_offset=True` (Gemma): the stored weight is an offset from one, `scale = 1 + w`
      (so a fresh norm stores zeros).

    (`eqx.nn.RMSNorm` multiplies first and has a bias by default: it matches neither.)
    Takes one token vector; use `jax.vmap(norm)(x)` for a sequence.
    """

    weight: Float[Array, " hidden"]
    eps: float = eqx.field(static=True)
    unit_offset: bool = eqx.field(static=True, default=False)
    weight_in_float32: bool = eqx.field(static=True, default=False)

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        *,
        unit_offset: bool = False,
        weight_in_float32: bool = False,
        dtype=jnp.float32,
    ):
        """**Arguments:** `hidden_size`; `eps` (HF `rms_norm_eps`); `unit_offset` (scale by
        `1 + weight`); `weight_in_float32` (multiply before casting back); `dtype` of the weight."""
        self.weight = (jnp.zeros if unit_offset else jnp.ones)((hidden_size,), dtype)
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight_in_float32 = weight_in_float32

    @typecheck
    def __call__(self, x: Float[Array, " hidden"]) -> Float[Array, " hidden"]:
        """**Arguments:** `x`, one token. **Returns:** the normalised token. Its dtype is `x`'s
        promoted with the weight's, as in HF (`bfloat16 x` with a float32 weight gives float32
        in Llama's order; `x`'s dtype in the float32-multiply order)."""
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32) + self.eps)
        if self.weight_in_float32:
            scale = self.weight.astype(jnp.float32)
            scale = 1.0 + scale if self.unit_offset else scale
            return (x32 * scale).astype(x.dtype)
        with jax.numpy_dtype_promotion("standard"):  # torch's rule: bf16 x * f32 weight -> f32
            out_dtype = jnp.promote_types(self.weight.dtype, x.dtype)
        scale = self.weight.astype(out_dtype)
        scale = 1 + scale if self.unit_offset else scale
        return scale * x32.astype(x.dtype).astype(out_dtype)


class LayerNorm(eqx.Module):
    r"""Layer normalisation with a learned scale and optional bias.

    $$y = w \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + b$$

    with the mean and (biased) variance computed in float32, as PyTorch's CPU kernel
    accumulates, and the result cast back to the input dtype. `use_bias=False` is Cohere's
    and OLMo's bias-free LayerNorm.

    Takes one token vector; use `jax.vmap(norm)(x)` for a sequence.
    """

    weight: Float[Array, " hidden"]
    bias: Float[Array, " hidden"] | None
    eps: float = eqx.field(static=True)

    def __init__(self, hidden_size: int, eps: float = 1e-5, *, use_bias: bool = True, dtype=jnp.float32):
        """**Arguments:** `hidden_size`; `eps` (HF `layer_norm_epsilon` / `layer_norm_eps`);
        `use_bias`; `dtype` of the weights."""
        self.weight = jnp.ones((hidden_size,), dtype)
        self.bias = jnp.zeros((hidden_size,), dtype) if use_bias else None
        self.eps = eps

    @typecheck
    def __call__(self, x: Float[Array, " hidden"]) -> Float[Array, " hidden"]:
        """**Arguments:** `x`, one token. **Returns:** the normalised token, in `x`'s dtype."""
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32)
        y = centred * jax.lax.rsqrt(jnp.mean(centred * centred) + self.eps)
        y = y * self.weight.astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias.astype(jnp.float32)
        return y.astype(x.dtype)
