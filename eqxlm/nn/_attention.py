"""Attention: the scaled-dot-product core, the per-forward frame of masks and cache writes,
and the projection module around them.

The split follows gpt-fast and equinox: `dot_product_attention(q, k, v, mask, bias)` is a
pure function; position handling is a part of its own (an [`AbstractPositionScheme`][]
that rotates or biases); masks and cache bookkeeping are built **once per forward** per
attention kind ([`attention_frames`][]) and handed to every layer of that kind.
"""

import functools
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .._typing import typecheck
from ._alibi import ALiBi
from ._kinds import AbstractTapped
from ._kv_cache import Cache, CacheWrite, KVCache
from ._linear import accumulator, einsum, linear, make_linear
from ._masks import attention_mask
from ._norm import LayerNorm, RMSNorm
from ._positions import AbstractPositionScheme
from ._taps import each_token, tap, wants


@typecheck
def dot_product_attention(
    query: Float[Array, "seq heads head_dim"],
    key: Float[Array, "kv_seq kv_heads head_dim"],
    value: Float[Array, "kv_seq kv_heads head_dim"],
    mask: Bool[Array, "#seq kv_seq"] | None = None,
    bias: Float[Array, " heads #seq kv_seq"] | None = None,
    scale: float | None = None,
    *,
    softcap: float | None = None,
    return_weights: bool = True,
    visible: tuple[int, int | None] | None = None,
) -> tuple[Float[Array, "seq heads head_dim"], Float[Array, "heads seq kv_seq"] | None]:
    r"""Scaled dot-product attention with grouped queries.

    $$\mathrm{softmax}\!\left(\mathrm{bias} + \mathrm{cap}(s\, q k^\top) \;\big|\; \mathrm{mask}\right) v,
    \qquad \mathrm{cap}(x) = c \tanh(x / c)$$

    - **Grouped-query attention**: with `heads = kv_heads * g`, key/value head `j` serves
      query heads `j*g ... j*g + g - 1` (transformers' `repeat_kv`, i.e.
      `repeat_interleave`). The queries are reshaped into groups instead of materialising
      repeated keys and values.
    - Scores are computed in the input dtype, scaled, soft-capped when `softcap` is set
      (Gemma 2), then the bias (e.g. ALiBi, float32) is cast to that dtype and added, and
      masked entries take the dtype's minimum, as transformers does. The softmax runs **in
      float32** and its result is cast back, as `softmax(..., dtype=float32)` in
      transformers. A row with no visible key (a query at a padding token) gets uniform
      weights instead of NaN; its output is meaningless and should be ignored.

    **Arguments:** `query`, `key`, `value`; `mask` (True = may attend; broadcasts over
    queries); `bias` (additive, per head); `scale` (default `head_dim ** -0.5`); `softcap`;
    `return_weights` (static: the weights are returned only when asked for); `visible`
    (static, optional): `(offset, window)` promises that `mask` hides every key `j` outside
    `i + offset - window < j <= i + offset` from query `i` (`window` None: no lower bound),
    as a causal or sliding-window mask over the sequence itself does (`offset` 0).
    Without weights, a query block longer than `QUERY_CHUNK` (1024) is attended in blocks
    of that many queries, so the scores held at once grow linearly with the number of keys
    (a prefill of 8,192 tokens holds 1/8 of the full score matrix); with `visible`, each
    block reads only the keys it may see, so a causal prefill does about half the work
    and a sliding window's grows linearly in the sequence. A row's softmax runs over the
    same visible keys either way (hidden keys weigh exactly 0): the same numbers up to the
    order of summation, except in rows that see no key at all (padding queries).

    **Returns:** the attended values, and the attention weights (`heads seq kv_seq`, in the
    input dtype) or None.
    """
    seq, heads, head_dim = query.shape
    kv_seq, kv_heads, _ = key.shape
    if heads % kv_heads:
        raise ValueError(f"dot_product_attention: heads ({heads}) must be a multiple of kv_heads ({kv_heads}).")
    scale = head_dim**-0.5 if scale is None else scale
    attend = functools.partial(_attend, key=key, value=value, scale=scale, softcap=softcap)
    if return_weights or seq <= QUERY_CHUNK:
        out, weights = attend(query, mask, bias)
        return out, weights if return_weights else None
    if visible is not None:
        return _attend_visible(query, key, value, mask, bias, visible, scale=scale, softcap=softcap), None
    # Long prompts: queries in blocks of QUERY_CHUNK under `lax.map`, so the scores live as
    # (heads, QUERY_CHUNK, kv_seq) at a time, linear in the keys, instead of (heads, seq, kv_seq).
    # Each query row's softmax is over all its keys either way: the same numbers.
    n = seq // QUERY_CHUNK
    head, tail = n * QUERY_CHUNK, slice(n * QUERY_CHUNK, seq)

    def rows(a, axis):  # (n, ..., QUERY_CHUNK, ...) blocks of the leading `head` rows, or a broadcast operand
        if a is None or a.shape[axis] == 1:
            return None
        a = jax.lax.slice_in_dim(a, 0, head, axis=axis)
        return jnp.moveaxis(a.reshape(*a.shape[:axis], n, QUERY_CHUNK, *a.shape[axis + 1 :]), axis, 0)

    blocks = (query[:head].reshape(n, QUERY_CHUNK, heads, head_dim), rows(mask, 0), rows(bias, 1))

    def one(block):
        q, m, b = block
        return attend(q, mask if m is None else m, bias if b is None else b)[0]

    out = jax.lax.map(one, blocks).reshape(head, heads, head_dim)
    if head < seq:
        last_mask = None if mask is None else (mask if mask.shape[0] == 1 else mask[tail])
        last_bias = None if bias is None else (bias if bias.shape[1] == 1 else bias[:, tail])
        out = jnp.concatenate([out, attend(query[tail], last_mask, last_bias)[0]])
    return out, None


#: Prompts longer than this many tokens attend in blocks of this many queries when no
#: attention weights are asked for (see `dot_product_attention`).
QUERY_CHUNK = 1024


def _attend_visible(query, key, value, mask, bias, visible, *, scale, softcap):
    # Query blocks in a Python loop (their key ranges differ in length, so no `lax.map`):
    # block [a, b) reads keys [lo, hi), the only ones `visible` lets it see.
    seq, kv_seq = query.shape[0], key.shape[0]
    offset, window = visible
    outs = []
    for a in range(0, seq, QUERY_CHUNK):
        b = min(a + QUERY_CHUNK, seq)
        hi = max(1, min(kv_seq, b + offset))
        lo = 0 if window is None else min(max(0, a + offset - window + 1), hi - 1)
        m = None if mask is None else mask[:, lo:hi] if mask.shape[0] == 1 else mask[a:b, lo:hi]
        bi = None if bias is None else bias[:, :, lo:hi] if bias.shape[1] == 1 else bias[:, a:b, lo:hi]
        q = query[a:b]
        if outs:  # Chain the blocks (adds zero; NaN-safe) so XLA runs them one after the other and one
            # block's scores are alive at a time: independent blocks were live together, several
            # score blocks of temporaries at once (NOTES.md, Long context); XLA:CPU drops
            # optimization_barrier.
            q = q + jnp.nan_to_num(outs[-1][-1, -1, -1]) * jnp.zeros((), q.dtype)
        outs.append(_attend(q, m, bi, key=key[lo:hi], value=value[lo:hi], scale=scale, softcap=softcap)[0])
    return jnp.concatenate(outs)


def _attend(query, mask, bias, *, key, value, scale, softcap):
    seq, heads, head_dim = query.shape
    kv_seq, kv_heads, _ = key.shape
    groups = heads // kv_heads
    dtype = query.dtype
    acc = accumulator(dtype)
    q = query.reshape(seq, kv_heads, groups, head_dim)
    if seq == 1:  # one query (a decode step) keeps the einsum: no gain measured there (NOTES.md, Long context)
        scores = einsum("skgd,tkd->kgst", q, key.astype(dtype))
    else:
        # Heads first, (kv_heads, groups * seq, head_dim) against (kv_heads, kv_seq, head_dim):
        # the scores come out in their (heads, seq, kv_seq) order, with no score-sized transpose
        # (the einsum made one, and was slower for it: NOTES.md, Long context)
        q = q.transpose(1, 2, 0, 3).reshape(kv_heads, groups * seq, head_dim)
        k = key.astype(dtype).transpose(1, 0, 2)
        scores = jax.lax.dot_general(q, k, (((2,), (2,)), BATCHED), preferred_element_type=acc).astype(dtype)
    # torch multiplies a reduced-float tensor by a Python float in float32 and rounds once
    # (a scale rounded to bfloat16 first, 8**-0.5 say, moved 2.4% of a layer's probabilities)
    scores = (scores.astype(acc) * scale).astype(dtype)
    scores = scores.reshape(heads, seq, kv_seq)
    if softcap is not None:
        scores = jnp.tanh(scores / jnp.asarray(softcap, dtype)) * jnp.asarray(softcap, dtype)
    if bias is not None:
        scores = bias.astype(dtype) + scores
    if mask is not None:
        scores = jnp.where(mask[None], scores, jnp.finfo(dtype).min)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)
    if seq == 1:
        out = einsum("kgst,tkd->skgd", weights.reshape(kv_heads, groups, seq, kv_seq), value.astype(dtype))
    else:
        v = value.astype(dtype).transpose(1, 0, 2)
        w = weights.reshape(kv_heads, groups * seq, kv_seq)
        out = jax.lax.dot_general(w, v, (((2,), (1,)), BATCHED), preferred_element_type=acc)
        out = out.astype(dtype).reshape(kv_heads, groups, seq, head_dim).transpose(2, 0, 1, 3)
    return out.reshape(seq, heads, head_dim), weights


BATCHED = ((0,), (0,))  # dot_general's batch dimensions: the leading (kv-head) axis of both operands


class AttentionFrame(eqx.Module):
    """What every attention layer of one kind needs for a block of `seq` tokens: the
    tokens' position ids (for rotary), the mask over the keys attended to, those keys'
    position ids (for ALiBi) and where the block goes in the cache (None without one).
    `visible` (static): what the mask promises about the keys each query may see, for
    `dot_product_attention` to skip the others: `(0, window)` without a cache, where the
    keys are the sequence itself; None with one. Built once per forward by
    [`attention_frames`][]."""

    positions: Int[Array, " seq"]
    mask: Bool[Array, "seq kv_seq"]
    key_positions: Int[Array, " kv_seq"]
    write: CacheWrite | None
    visible: tuple[int, int | None] | None = eqx.field(static=True, default=None)


@typecheck
def attention_frames(
    windows: tuple[int | None, ...],
    positions: Int[Array, " seq"],
    valid: Bool[Array, " seq"],
    cache: Cache | None = None,
) -> tuple[tuple[AttentionFrame, ...], Cache | None]:
    """One [`AttentionFrame`][] per attention kind (`windows`: None = full causal, an int =
    that sliding window), and the cache with its slot tables advanced (its per-layer keys
    and values are written by the layers themselves).

    Queries and keys are identified by slots (the token's index in the padded sequence),
    masks compare slots as `masking_utils` compares indices, and padded keys are never seen.
    """
    seq = positions.shape[0]
    if cache is None:
        slots = jnp.arange(seq, dtype=jnp.int32)
        key_slots = jnp.where(valid, slots, -1)
        frames = tuple(
            AttentionFrame(positions, attention_mask(slots, key_slots, key_slots >= 0, w), positions, None, visible=(0, w))
            for w in windows
        )
        return frames, None
    if cache.windows != tuple(windows):
        raise ValueError(f"the cache was made for attention windows {cache.windows}, the model has {tuple(windows)}.")
    query_slots = cache.end + jnp.arange(seq, dtype=jnp.int32)
    frames, tables = [], []
    for window, table in zip(windows, cache.tables, strict=True):
        table, key_slots, key_positions, write = table.advance(cache.end, valid, positions)
        mask = attention_mask(query_slots, key_slots, key_slots >= 0, window)
        frames.append(AttentionFrame(positions, mask, key_positions, write))
        tables.append(table)
    cache = Cache(
        layers=cache.layers,
        tables=tuple(tables),
        end=cache.end + seq,
        next_position=cache.next_position + jnp.sum(valid, dtype=jnp.int32),
        windows=cache.windows,
    )
    return tuple(frames), cache


class Attention(AbstractTapped):
    """Multi-head attention with separate `q_proj`/`k_proj`/`v_proj`/`o_proj`.

    The one attention of every family; the differences are choices:

    - grouped-query attention when `num_kv_heads < num_heads` (multi-query at 1);
    - biases on q/k/v and on o separately (`qkv_bias`, `o_bias`: Qwen2 has the first only);
    - `position_scheme`: rotary, ALiBi, or None (learned positions live in the embeddings);
    - `q_norm`/`k_norm`: a norm per head (`qk_norm="head"`: Qwen3, Gemma 3; one weight shared
      by the heads), a norm per head with each head's own weight (`"head_weights"`: Cohere's
      `use_qk_norm`, weights stored `(heads, head_dim)`), or over the whole projection
      (`"full"`: OLMo-2), applied before the rotation;
    - `scale` (default `head_dim ** -0.5`) and `logit_softcap` (Gemma 2);
    - `sliding_window`: which attention kind (frame) the layer uses.

    Fused checkpoint projections (`query_key_value`, `c_attn`, `qkv_proj`) are split into
    q/k/v by their family's key map on import and joined again on export.
    Takes a block of `seq` tokens of one sequence (`jax.vmap` for a batch).
    """

    q_proj: eqx.nn.Linear
    k_proj: eqx.nn.Linear
    v_proj: eqx.nn.Linear
    o_proj: eqx.nn.Linear
    position_scheme: AbstractPositionScheme | None
    q_norm: RMSNorm | LayerNorm | None
    k_norm: RMSNorm | LayerNorm | None
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    sliding_window: int | None = eqx.field(static=True)
    scale: float | None = eqx.field(static=True)
    logit_softcap: float | None = eqx.field(static=True)
    qk_norm: str | None = eqx.field(static=True)
    tap_points: ClassVar[tuple[str, ...]] = ("q", "k", "v", "probs", "z")

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        position_scheme: AbstractPositionScheme | None = None,
        sliding_window: int | None = None,
        scale: float | None = None,
        logit_softcap: float | None = None,
        qk_norm: str | None = None,
        make_norm=None,
        dtype=jnp.float32,
        key: PRNGKeyArray,
    ):
        """**Arguments:** `hidden_size`; `num_heads`; `num_kv_heads` (default `num_heads`);
        `head_dim` (default `hidden_size // num_heads`); `qkv_bias`, `o_bias`;
        `position_scheme`; `sliding_window` (None = full causal); `scale`; `logit_softcap`;
        `qk_norm` (None, `"head"`, `"head_weights"` or `"full"`) with `make_norm(size)` building each norm;
        `dtype`; `key`."""
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        if num_heads % num_kv_heads:
            raise ValueError(f"Attention: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads}).")
        if qk_norm not in (None, "head", "head_weights", "full"):
            raise ValueError(f"Attention: qk_norm must be None, 'head', 'head_weights' or 'full', got {qk_norm!r}.")
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.q_proj = make_linear(hidden_size, num_heads * head_dim, qkv_bias, dtype, kq)
        self.k_proj = make_linear(hidden_size, num_kv_heads * head_dim, qkv_bias, dtype, kk)
        self.v_proj = make_linear(hidden_size, num_kv_heads * head_dim, qkv_bias, dtype, kv)
        self.o_proj = make_linear(num_heads * head_dim, hidden_size, o_bias, dtype, ko)
        self.position_scheme = position_scheme
        if qk_norm is None:
            self.q_norm = self.k_norm = None
        elif qk_norm == "head_weights":  # one norm per head: every array leaf stacked over the heads
            stack = lambda norm, n: jax.tree.map(lambda a: jnp.tile(a[None], (n,) + (1,) * a.ndim), norm)  # noqa: E731
            self.q_norm = stack(make_norm(head_dim), num_heads)
            self.k_norm = stack(make_norm(head_dim), num_kv_heads)
        else:
            per_head = qk_norm == "head"
            self.q_norm = make_norm(head_dim if per_head else num_heads * head_dim)
            self.k_norm = make_norm(head_dim if per_head else num_kv_heads * head_dim)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.sliding_window = sliding_window
        self.scale = scale
        self.logit_softcap = logit_softcap
        self.qk_norm = qk_norm

    def _project(self, proj, norm, x, heads):
        y = linear(proj, x)
        if self.qk_norm == "full":
            y = each_token(norm, y)
        y = y.reshape(x.shape[0], heads, self.head_dim)
        if self.qk_norm == "head":
            y = each_token(norm, y)
        elif self.qk_norm == "head_weights":
            y = jax.vmap(jax.vmap(lambda n, t: n(t)), in_axes=(None, 0))(norm, y)
        return y

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
        the points `q`, `k`, `v` (after rotary), `probs`, `z` (each head's output before
        `o_proj`); None = none, the same program as without). **Returns:** output,
        attention weights (or None), updated cache."""
        seq = x.shape[0]
        q = self._project(self.q_proj, self.q_norm, x, self.num_heads)
        k = self._project(self.k_proj, self.k_norm, x, self.num_kv_heads)
        v = linear(self.v_proj, x).reshape(seq, self.num_kv_heads, self.head_dim)
        scheme = self.position_scheme
        if scheme is not None:
            q = scheme.rotate(q, frame.positions)
            k = scheme.rotate(k, frame.positions)
        q, k, v = tap(taps, "q", q), tap(taps, "k", k), tap(taps, "v", v)
        if cache is not None:
            cache, k, v = cache.update(frame.write, k, v)
        bias = None if scheme is None else scheme.bias(frame.key_positions)
        out, weights = dot_product_attention(
            q,
            k,
            v,
            mask=frame.mask,
            bias=None if bias is None else bias[:, None, :],
            scale=self.scale,
            softcap=self.logit_softcap,
            return_weights=return_weights or wants(taps, "probs"),
            visible=frame.visible,
        )
        if wants(taps, "probs"):
            weights = tap(taps, "probs", weights)
            weights = weights if return_weights else None
        out = tap(taps, "z", out)
        return linear(self.o_proj, out.reshape(seq, -1)), weights, cache


__all__ = ["ALiBi", "Attention", "AttentionFrame", "attention_frames", "dot_product_attention"]
