"""The decoder layer: one residual block whose layout is a handful of choices."""

from typing import Any, ClassVar

import equinox as eqx
from jaxtyping import Array, Float

from .._typing import typecheck
from ._attention import Attention, AttentionFrame
from ._kinds import AbstractTapped
from ._kv_cache import KVCache
from ._norm import LayerNorm, RMSNorm
from ._taps import each_token, tap

Norm = RMSNorm | LayerNorm


def _norm(norm, x):
    return x if norm is None else each_token(norm, x)


def feed_forward(mlp, x: Float[Array, "seq hidden"]) -> Float[Array, "seq hidden"]:
    """Apply a feed-forward block to a sequence: to every token (vmapped), or once to the
    whole sequence when the block says it can (an `eqxlm.nn.AbstractTokenAxes`: `GatedMLP`,
    `MLP`, as a few large products) or must (an `eqxlm.nn.AbstractSequenceWise`: a mixture of
    experts, which groups the tokens by expert)."""
    return each_token(mlp, x)


class DecoderLayer(AbstractTapped):
    """One residual block. Llama's layout is the default; the other families are choices:

        sequential (Llama, Mistral, Qwen, BLOOM, GPT-2):
            a = input_layernorm(x);               h = r(x) + m * attn_out_norm(self_attn(a))
            b = post_attention_layernorm(h);      y = r(h) + m * mlp_out_norm(mlp(b))
        parallel (GPT-NeoX, Phi, Cohere):
            a = input_layernorm(x);  b = post_attention_layernorm(x) or a
            y = x + self_attn(a) + mlp(b)

    where a missing norm is the identity (OLMo-2 has no input norms; Gemma 2 has all four),
    `r(v)` is `v` or, with `residual_from_norm` (BLOOM's
    `apply_residual_connection_post_layernorm`), the normed input of that sub-block, and
    `m` is `residual_multiplier` (Granite; default 1). Attribute names are Llama's checkpoint
    keys; other families' key maps rename them (Gemma's `pre_feedforward_layernorm` is the
    `post_attention_layernorm` here, its `post_attention_layernorm` the `attn_out_norm`).
    """

    input_layernorm: Norm | None
    self_attn: Attention
    post_attention_layernorm: Norm | None
    mlp: Any
    attn_out_norm: Norm | None = None
    mlp_out_norm: Norm | None = None
    parallel: bool = eqx.field(static=True, default=False)
    residual_from_norm: bool = eqx.field(static=True, default=False)
    residual_multiplier: float | None = eqx.field(static=True, default=None)
    tap_points: ClassVar[tuple[str, ...]] = ("resid_mid",)  # `resid_pre`/`resid_post`: its input/output

    def _scaled(self, x):
        return x if self.residual_multiplier is None else x * self.residual_multiplier

    @typecheck
    def __call__(
        self,
        x: Float[Array, "seq hidden"],
        frame: AttentionFrame,
        cache: KVCache | None = None,
        *,
        return_weights: bool = False,
        taps=None,
    ) -> tuple[Float[Array, "seq hidden"], Float[Array, "heads seq kv_seq"] | None, KVCache | None]:
        """**Arguments:** `x`; the `frame` of this layer's attention kind; this layer's
        `cache`; `return_weights` (static); `taps` (static, set by an `eqxlm.inspect` hook:
        the point `resid_mid`, the residual stream between attention and MLP of a sequential
        layer; None = none). **Returns:** the block output, the attention weights (or None)
        and the updated cache."""
        a = _norm(self.input_layernorm, x)
        attn, weights, cache = self.self_attn(a, frame, cache, return_weights=return_weights)
        attn = _norm(self.attn_out_norm, attn)
        if self.parallel:
            b = a if self.post_attention_layernorm is None else _norm(self.post_attention_layernorm, x)
            mlp = _norm(self.mlp_out_norm, feed_forward(self.mlp, b))
            return x + attn + mlp, weights, cache
        h = tap(taps, "resid_mid", (a if self.residual_from_norm else x) + self._scaled(attn))
        b = _norm(self.post_attention_layernorm, h)
        mlp = _norm(self.mlp_out_norm, feed_forward(self.mlp, b))
        return (b if self.residual_from_norm else h) + self._scaled(mlp), weights, cache
