"""Attention: one scaled-dot-product core and the two projection layouts around it."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .._typing import typecheck
from ._alibi import ALiBi
from ._kv_cache import KVCache
from ._linear import linear, make_linear
from ._masks import attention_mask
from ._rotary import RotaryEmbedding


@typecheck
def dot_product_attention(
    query: Float[Array, "seq heads head_dim"],
    key: Float[Array, "kv_seq kv_heads head_dim"],
    value: Float[Array, "kv_seq kv_heads head_dim"],
    mask: Bool[Array, "#seq kv_seq"] | None = None,
    bias: Float[Array, " heads #seq kv_seq"] | None = None,
    scale: float | None = None,
) -> tuple[Float[Array, "seq heads head_dim"], Float[Array, "heads seq kv_seq"]]:
    r"""Scaled dot-product attention with grouped queries.

    $$\mathrm{softmax}\!\left(\mathrm{bias} + s\, q k^\top \;\big|\; \mathrm{mask}\right) v$$

    - **Grouped-query attention**: with `heads = kv_heads * g`, key/value head `j` serves
      query heads `j*g ... j*g + g - 1` (transformers' `repeat_kv`, i.e.
      `repeat_interleave`). The queries are reshaped into groups instead of materialising
      repeated keys and values.
    - Scores are computed in the input dtype; the bias (e.g. ALiBi, float32) is cast to it
      first, and masked entries take the dtype's minimum, as transformers does. The softmax
      runs **in float32** and its result is cast back, as `softmax(..., dtype=float32)` in
      transformers. A row with no visible key (a query at a padding token) gets uniform
      weights instead of NaN; its output is meaningless and should be ignored.

    **Arguments:** `query`, `key`, `value`; `mask` (True = may attend; broadcasts over
    queries); `bias` (additive, per head); `scale` (default `head_dim ** -0.5`).

    **Returns:** the attended values and the float attention weights (`heads seq kv_seq`,
    in the input dtype).
    """
    seq, heads, head_dim = query.shape
    kv_seq, kv_heads, _ = key.shape
    if heads % kv_heads:
        raise ValueError(f"dot_product_attention: heads ({heads}) must be a multiple of kv_heads ({kv_heads}).")
    groups = heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    dtype = query.dtype
    q = query.reshape(seq, kv_heads, groups, head_dim)
    scores = jnp.einsum("skgd,tkd->kgst", q, key.astype(dtype)) * jnp.asarray(scale, dtype)
    scores = scores.reshape(heads, seq, kv_seq)
    if bias is not None:
        scores = bias.astype(dtype) + scores
    if mask is not None:
        scores = jnp.where(mask[None], scores, jnp.finfo(dtype).min)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)
    out = jnp.einsum("kgst,tkd->skgd", weights.reshape(kv_heads, groups, seq, kv_seq), value.astype(dtype))
    return out.reshape(seq, heads, head_dim), weights


@typecheck
def attend(
    query: Float[Array, "seq heads head_dim"],
    key: Float[Array, "seq kv_heads head_dim"],
    value: Float[Array, "seq kv_heads head_dim"],
    positions: Int[Array, " seq"],
    valid: Bool[Array, " seq"],
    *,
    rotary: RotaryEmbedding | None = None,
    alibi: ALiBi | None = None,
    sliding_window: int | None = None,
    cache: KVCache | None = None,
) -> tuple[Float[Array, "seq heads head_dim"], Float[Array, "heads seq kv_seq"], KVCache | None]:
    """Everything between the projections: position scheme, cache, mask, core.

    Shared by [`Attention`][] and [`BloomAttention`][], so any position scheme
    (rotary, ALiBi or none) combines with any projection layout, window and cache.

    **Arguments:** projected `query`/`key`/`value` for a block of `seq` tokens; their
    `positions` (position ids) and `valid` (False at padding); `rotary`, `alibi`,
    `sliding_window` (None = full causal); `cache` (None = the block is the whole sequence).

    **Returns:** the attended values, the attention weights and the updated cache.
    """
    if rotary is not None:
        query = rotary(query, positions)
        key = rotary(key, positions)
    if cache is None:
        query_slots = jnp.arange(query.shape[0], dtype=jnp.int32)
        key_slots = jnp.where(valid, query_slots, -1)
        key_positions = positions
    else:
        query_slots = cache.end + jnp.arange(query.shape[0], dtype=jnp.int32)
        cache, key, value, key_slots, key_positions = cache.update(key, value, valid, positions)
    mask = attention_mask(query_slots, key_slots, key_slots >= 0, sliding_window)
    bias = None if alibi is None else alibi(key_positions)[:, None, :]
    out, weights = dot_product_attention(query, key, value, mask=mask, bias=bias)
    return out, weights, cache


class Attention(eqx.Module):
    """Multi-head attention with separate `q_proj`/`k_proj`/`v_proj`/`o_proj` (Mistral, Llama).

    Grouped-query attention when `num_kv_heads < num_heads` (multi-query at 1); rotary,
    ALiBi or no position scheme; full causal or sliding-window masking; optional
    projection biases (Llama's `attention_bias`). Attribute names are the Hugging Face
    checkpoint keys (`self_attn.q_proj.weight`, ...).

    Takes a block of `seq` tokens of one sequence (`jax.vmap` for a batch).
    """

    q_proj: eqx.nn.Linear
    k_proj: eqx.nn.Linear
    v_proj: eqx.nn.Linear
    o_proj: eqx.nn.Linear
    rotary: RotaryEmbedding | None
    alibi: ALiBi | None
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    sliding_window: int | None = eqx.field(static=True)

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        use_bias: bool = False,
        rotary: RotaryEmbedding | None = None,
        alibi: ALiBi | None = None,
        sliding_window: int | None = None,
        dtype=jnp.float32,
        key: PRNGKeyArray,
    ):
        """**Arguments:** `hidden_size`; `num_heads`; `num_kv_heads` (default `num_heads`);
        `head_dim` (default `hidden_size // num_heads`); `use_bias` on all four projections;
        `rotary` / `alibi` position scheme; `sliding_window` (None = full causal); `dtype`;
        `key`."""
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        if num_heads % num_kv_heads:
            raise ValueError(f"Attention: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads}).")
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.q_proj = make_linear(hidden_size, num_heads * head_dim, use_bias, dtype, kq)
        self.k_proj = make_linear(hidden_size, num_kv_heads * head_dim, use_bias, dtype, kk)
        self.v_proj = make_linear(hidden_size, num_kv_heads * head_dim, use_bias, dtype, kv)
        self.o_proj = make_linear(num_heads * head_dim, hidden_size, use_bias, dtype, ko)
        self.rotary = rotary
        self.alibi = alibi
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.sliding_window = sliding_window

    @typecheck
    def __call__(
        self,
        x: Float[Array, "seq hidden"],
        positions: Int[Array, " seq"],
        valid: Bool[Array, " seq"],
        cache: KVCache | None = None,
    ) -> tuple[Float[Array, "seq hidden"], Float[Array, "heads seq kv_seq"], KVCache | None]:
        """**Arguments:** `x`; `positions` (position ids); `valid` (False at padding);
        `cache`. **Returns:** output, attention weights, updated cache."""
        seq = x.shape[0]
        q = linear(self.q_proj, x).reshape(seq, self.num_heads, self.head_dim)
        k = linear(self.k_proj, x).reshape(seq, self.num_kv_heads, self.head_dim)
        v = linear(self.v_proj, x).reshape(seq, self.num_kv_heads, self.head_dim)
        out, weights, cache = attend(
            q,
            k,
            v,
            positions,
            valid,
            rotary=self.rotary,
            alibi=self.alibi,
            sliding_window=self.sliding_window,
            cache=cache,
        )
        return linear(self.o_proj, out.reshape(seq, -1)), weights, cache


class BloomAttention(eqx.Module):
    """BLOOM's attention: one fused `query_key_value` projection and a `dense` output.

    The fused weight (`3*hidden x hidden`) is interleaved **per head**: its output viewed as
    `(heads, 3, head_dim)` gives each head's query, key and value (not `[Q; K; V]`
    stacked), as `BloomAttention._reshape` does. Both projections have biases. Position
    information comes from ALiBi by default (any [`attend`][] scheme works).
    """

    query_key_value: eqx.nn.Linear
    dense: eqx.nn.Linear
    alibi: ALiBi | None
    rotary: RotaryEmbedding | None
    num_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    sliding_window: int | None = eqx.field(static=True)

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        alibi: ALiBi | None = None,
        rotary: RotaryEmbedding | None = None,
        sliding_window: int | None = None,
        dtype=jnp.float32,
        key: PRNGKeyArray,
    ):
        """**Arguments:** `hidden_size`; `num_heads`; `alibi` (default: ALiBi for
        `num_heads`); `rotary`; `sliding_window`; `dtype`; `key`."""
        if hidden_size % num_heads:
            raise ValueError(f"BloomAttention: hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}).")
        k1, k2 = jax.random.split(key)
        self.query_key_value = make_linear(hidden_size, 3 * hidden_size, True, dtype, k1)
        self.dense = make_linear(hidden_size, hidden_size, True, dtype, k2)
        self.alibi = ALiBi(num_heads) if alibi is None and rotary is None else alibi
        self.rotary = rotary
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.sliding_window = sliding_window

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @typecheck
    def __call__(
        self,
        x: Float[Array, "seq hidden"],
        positions: Int[Array, " seq"],
        valid: Bool[Array, " seq"],
        cache: KVCache | None = None,
    ) -> tuple[Float[Array, "seq hidden"], Float[Array, "heads seq kv_seq"], KVCache | None]:
        """**Arguments:** `x`; `positions`; `valid`; `cache`. **Returns:** output
        (before the residual), attention weights, updated cache."""
        seq = x.shape[0]
        fused = linear(self.query_key_value, x).reshape(seq, self.num_heads, 3, self.head_dim)
        q, k, v = fused[:, :, 0], fused[:, :, 1], fused[:, :, 2]
        out, weights, cache = attend(
            q,
            k,
            v,
            positions,
            valid,
            rotary=self.rotary,
            alibi=self.alibi,
            sliding_window=self.sliding_window,
            cache=cache,
        )
        return linear(self.dense, out.reshape(seq, -1)), weights, cache
