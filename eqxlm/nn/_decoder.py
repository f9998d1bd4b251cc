"""Decoder layers: residual blocks that share the attention, MLP and norm parts, and the
block layouts (small frozen specs, one per layout) that build them.

A family picks its layout by value (`PreNorm()`, `Sandwich()`, `Parallel(norms=2)`, ...);
a layout of one's own is a frozen dataclass subclassing [`AbstractBlock`][] whose `make`
returns any [`AbstractDecoderLayer`][]: no change to eqxlm.
"""

import abc
import dataclasses
from collections.abc import Callable
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
Hidden = Float[Array, "seq hidden"]
Out = tuple[Hidden, Float[Array, "heads seq kv_seq"] | None, KVCache | None]  # output, attention weights, cache


def _norm(norm, x):
    return x if norm is None else each_token(norm, x)


def feed_forward(mlp, x: Float[Array, "seq hidden"]) -> Float[Array, "seq hidden"]:
    """Apply a feed-forward block to a sequence: to every token (vmapped), or once to the
    whole sequence when the block says it can (an `eqxlm.nn.AbstractTokenAxes`: `GatedMLP`,
    `MLP`, as a few large products) or must (an `eqxlm.nn.AbstractSequenceWise`: a mixture of
    experts, which groups the tokens by expert)."""
    return each_token(mlp, x)


class AbstractDecoderLayer(AbstractTapped):
    """One decoder layer: a residual block around a `self_attn` ([`Attention`][]) and an
    MLP. The builder, scanned stacks, `eqxlm.inspect` (its `resid_pre` / `resid_post` are
    a layer's input / output) and `eqxlm.training.Remat` know a layer by this base.

    Its `__call__(x, frame, cache=None, *, return_weights=False, taps=None)` takes the
    sequence `x`, the `frame` of its attention kind and its `cache`, and returns
    `(output, attention weights or None, updated cache)`.

    **Attributes:** `self_attn` (an abstract field: the frame of a layer is that of its
    attention's `sliding_window`).
    """

    self_attn: eqx.AbstractVar[Attention]


class SequentialLayer(AbstractDecoderLayer):
    """Attention, then the MLP, each with its own residual add (Llama, Gemma 2/3, OLMo-2,
    Granite):

        h = x + m * attn_out_norm(self_attn(input_layernorm(x)))
        y = h + m * mlp_out_norm(mlp(post_attention_layernorm(h)))

    where a missing norm (None) is the identity and `m` is `residual_multiplier` (Granite's;
    None = 1, no product). Attribute names are Llama's checkpoint keys; other families' key
    maps rename them (Gemma's `pre_feedforward_layernorm` is the `post_attention_layernorm`
    here, its `post_attention_layernorm` the `attn_out_norm`).
    """

    input_layernorm: Norm | None
    self_attn: Attention
    post_attention_layernorm: Norm | None
    mlp: Any
    attn_out_norm: Norm | None = None
    mlp_out_norm: Norm | None = None
    residual_multiplier: float | None = eqx.field(static=True, default=None)
    tap_points: ClassVar[tuple[str, ...]] = ("resid_mid",)  # `resid_pre`/`resid_post`: its input/output

    def _scaled(self, x):
        return x if self.residual_multiplier is None else x * self.residual_multiplier

    @typecheck
    def __call__(self, x: Hidden, frame: AttentionFrame, cache: KVCache | None = None, *, return_weights=False, taps=None) -> Out:
        """**Arguments:** `x`; the `frame` of this layer's attention kind; this layer's
        `cache`; `return_weights` (static); `taps` (static, set by an `eqxlm.inspect` hook:
        the point `resid_mid`, the residual stream between attention and MLP; None = none).
        **Returns:** the block output, the attention weights (or None) and the updated cache."""
        a = _norm(self.input_layernorm, x)
        attn, weights, cache = self.self_attn(a, frame, cache, return_weights=return_weights)
        attn = _norm(self.attn_out_norm, attn)
        h = tap(taps, "resid_mid", x + self._scaled(attn))
        b = _norm(self.post_attention_layernorm, h)
        mlp = _norm(self.mlp_out_norm, feed_forward(self.mlp, b))
        return h + self._scaled(mlp), weights, cache


class NormResidualLayer(AbstractDecoderLayer):
    """A pre-norm sequential block whose residuals start from the normed input of each
    sub-block (BLOOM's `apply_residual_connection_post_layernorm`, `BloomBlock.forward`):

        a = input_layernorm(x);             h = a + self_attn(a)
        b = post_attention_layernorm(h);    y = b + mlp(b)
    """

    input_layernorm: Norm
    self_attn: Attention
    post_attention_layernorm: Norm
    mlp: Any
    tap_points: ClassVar[tuple[str, ...]] = ("resid_mid",)

    @typecheck
    def __call__(self, x: Hidden, frame: AttentionFrame, cache: KVCache | None = None, *, return_weights=False, taps=None) -> Out:
        """As [`SequentialLayer`][]'s."""
        a = each_token(self.input_layernorm, x)
        attn, weights, cache = self.self_attn(a, frame, cache, return_weights=return_weights)
        h = tap(taps, "resid_mid", a + attn)
        b = each_token(self.post_attention_layernorm, h)
        return b + feed_forward(self.mlp, b), weights, cache


class ParallelLayer(AbstractDecoderLayer):
    """Attention and MLP side by side on the same input, one residual add (GPT-NeoX, Phi,
    Cohere):

        a = input_layernorm(x);   b = post_attention_layernorm(x), or a when it is None
        y = x + self_attn(a) + mlp(b)

    It has no point between attention and MLP (no `resid_mid`).
    """

    input_layernorm: Norm
    self_attn: Attention
    post_attention_layernorm: Norm | None
    mlp: Any
    tap_points: ClassVar[tuple[str, ...]] = ()

    @typecheck
    def __call__(self, x: Hidden, frame: AttentionFrame, cache: KVCache | None = None, *, return_weights=False, taps=None) -> Out:
        """As [`SequentialLayer`][]'s (`taps` has no point here)."""
        a = each_token(self.input_layernorm, x)
        attn, weights, cache = self.self_attn(a, frame, cache, return_weights=return_weights)
        b = a if self.post_attention_layernorm is None else _norm(self.post_attention_layernorm, x)
        return x + attn + feed_forward(self.mlp, b), weights, cache


MakeNorm = Callable[[], Norm]


class AbstractBlock(abc.ABC):
    """A block layout: a frozen (hashable) dataclass whose `make(attn, mlp, norm)` builds one
    decoder layer ([`AbstractDecoderLayer`][]) from that layer's `attn` ([`Attention`][]),
    its `mlp` and `norm`, a function returning a fresh norm of the model's kind each call.
    A `DecoderSpec`'s `block`; the builder initialises the weights afterwards."""

    @abc.abstractmethod
    def make(self, attn: Attention, mlp, norm: MakeNorm) -> AbstractDecoderLayer:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class PreNorm(AbstractBlock):
    """Norms before attention and MLP (Llama, Mistral, Qwen, GPT-2): a
    [`SequentialLayer`][]; `residual_multiplier` scales each sub-block's output before its
    residual add (Granite's; None = none)."""

    residual_multiplier: float | None = None

    def make(self, attn, mlp, norm):
        return SequentialLayer(norm(), attn, norm(), mlp, residual_multiplier=self.residual_multiplier)


@dataclasses.dataclass(frozen=True)
class Sandwich(AbstractBlock):
    """Norms before and after attention and MLP (Gemma 2 and 3): a [`SequentialLayer`][]
    with all four norms."""

    def make(self, attn, mlp, norm):
        return SequentialLayer(norm(), attn, norm(), mlp, attn_out_norm=norm(), mlp_out_norm=norm())


@dataclasses.dataclass(frozen=True)
class PostNorm(AbstractBlock):
    """Norms after attention and MLP only, before their residual adds (OLMo-2): a
    [`SequentialLayer`][] without input norms."""

    def make(self, attn, mlp, norm):
        return SequentialLayer(None, attn, None, mlp, attn_out_norm=norm(), mlp_out_norm=norm())


@dataclasses.dataclass(frozen=True)
class NormResidual(AbstractBlock):
    """Pre-norm with each residual taken from the normed input (BLOOM's
    `apply_residual_connection_post_layernorm`): a [`NormResidualLayer`][]."""

    def make(self, attn, mlp, norm):
        return NormResidualLayer(norm(), attn, norm(), mlp)


@dataclasses.dataclass(frozen=True)
class Parallel(AbstractBlock):
    """Attention and MLP in parallel on one residual (a [`ParallelLayer`][]), with `norms`
    1 (one shared input norm: Phi, Cohere) or 2 (one each: GPT-NeoX)."""

    norms: int = 1

    def __post_init__(self):
        if self.norms not in (1, 2):
            raise ValueError(f"Parallel: norms must be 1 or 2, got {self.norms!r}.")

    def make(self, attn, mlp, norm):
        return ParallelLayer(norm(), attn, norm() if self.norms == 2 else None, mlp)
