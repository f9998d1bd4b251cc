"""Decoder layers: the residual blocks that models stack."""

import equinox as eqx
import jax
from jaxtyping import Array, Bool, Float, Int

from .._typing import typecheck
from ._attention import Attention, BloomAttention
from ._kv_cache import KVCache
from ._mlp import BloomMLP, GatedMLP
from ._norm import LayerNorm, RMSNorm

LayerResult = tuple[Float[Array, "seq hidden"], Float[Array, "heads seq kv_seq"], KVCache | None]


class DecoderLayer(eqx.Module):
    """The pre-norm residual block of Llama and Mistral (`LlamaDecoderLayer`):

        h = x + self_attn(input_layernorm(x))
        y = h + mlp(post_attention_layernorm(h))

    Any attention ([`Attention`][] or [`BloomAttention`][]), norm and MLP fit: the fields
    are typed by role, and the attribute names are the checkpoint keys.
    """

    input_layernorm: RMSNorm | LayerNorm
    self_attn: Attention | BloomAttention
    post_attention_layernorm: RMSNorm | LayerNorm
    mlp: GatedMLP | BloomMLP

    @typecheck
    def __call__(
        self,
        x: Float[Array, "seq hidden"],
        positions: Int[Array, " seq"],
        valid: Bool[Array, " seq"],
        cache: KVCache | None = None,
    ) -> LayerResult:
        """**Returns:** the block output, the attention weights and the updated cache."""
        attn_out, weights, cache = self.self_attn(jax.vmap(self.input_layernorm)(x), positions, valid, cache)
        h = x + attn_out
        return h + jax.vmap(self.mlp)(jax.vmap(self.post_attention_layernorm)(h)), weights, cache


class BloomBlock(eqx.Module):
    """BLOOM's block (`BloomBlock`), with `apply_residual_connection_post_layernorm`:

    a = input_layernorm(x);           h = self_attention(a) + (a if post_ln else x)
    b = post_attention_layernorm(h);  y = mlp(b) + (b if post_ln else h)
    """

    input_layernorm: LayerNorm | RMSNorm
    self_attention: BloomAttention | Attention
    post_attention_layernorm: LayerNorm | RMSNorm
    mlp: BloomMLP | GatedMLP
    apply_residual_connection_post_layernorm: bool = eqx.field(static=True, default=False)

    @typecheck
    def __call__(
        self,
        x: Float[Array, "seq hidden"],
        positions: Int[Array, " seq"],
        valid: Bool[Array, " seq"],
        cache: KVCache | None = None,
    ) -> LayerResult:
        """**Returns:** the block output, the attention weights and the updated cache."""
        post_ln = self.apply_residual_connection_post_layernorm
        a = jax.vmap(self.input_layernorm)(x)
        attn_out, weights, cache = self.self_attention(a, positions, valid, cache)
        h = attn_out + (a if post_ln else x)
        b = jax.vmap(self.post_attention_layernorm)(h)
        return jax.vmap(self.mlp)(b) + (b if post_ln else h), weights, cache
