"""The Llama-like builder: most decoder-only families differ from Llama in a short list of
choices, written down as a [`DecoderSpec`][]; [`DecoderLM`][] builds and runs any spec.

A family file (`llama.py`, `qwen2.py`, ...) is then a config class with Hugging Face field
names, its `decoder_spec()`, and a key map for checkpoint names that differ from Llama's.
A choice a new family needs goes here and into the parts (`eqxlm.nn`), never into a copy
of a class.
"""

import dataclasses
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .._memory import check_constructor
from .._typing import typecheck
from ..nn import (
    MLP,
    AbstractBlock,
    AbstractDecoderLayer,
    AbstractSequenceWise,
    ALiBi,
    Attention,
    Cache,
    GatedMLP,
    KVCache,
    LayerNorm,
    LayerStack,
    PreNorm,
    RMSNorm,
    RopeScaling,
    RotaryEmbedding,
    SlotTable,
    SparseMoE,
    attention_frames,
    regroup,
    run_layers,
)
from ..nn._activations import activation
from ..nn._linear import linear, make_linear, times_weight
from ..nn._rotary import longrope_uses_long
from ..nn._taps import each_token
from ._contract import AbstractCausalLM, GenerationConfig, ModelOutput


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """`kind` `"rms"` or `"layer"`; `eps`; `bias` (LayerNorm); `unit_offset` and
    `weight_in_float32` (RMSNorm numerics: see [`eqxlm.nn.RMSNorm`][])."""

    kind: str
    eps: float
    bias: bool = True
    unit_offset: bool = False
    weight_in_float32: bool = False

    def make(self, size: int, dtype):
        if self.kind == "rms":
            return RMSNorm(size, self.eps, unit_offset=self.unit_offset, weight_in_float32=self.weight_in_float32, dtype=dtype)
        if self.kind == "layer":
            return LayerNorm(size, self.eps, use_bias=self.bias, dtype=dtype)
        raise ValueError(f"NormSpec: kind must be 'rms' or 'layer', got {self.kind!r}.")


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Rotary settings: `theta`, `scaling`, the rotated `fraction` of each head (partial
    rotary), and the `interleaved` pair layout."""

    theta: float = 10000.0
    scaling: RopeScaling | None = None
    fraction: float = 1.0
    interleaved: bool = False

    def make(self, head_dim: int) -> RotaryEmbedding:
        rotary_dim = int(head_dim * self.fraction)
        return RotaryEmbedding(head_dim, self.theta, self.scaling, rotary_dim=rotary_dim, interleaved=self.interleaved)


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """A sparse mixture-of-experts MLP (see [`eqxlm.nn.SparseMoE`][]): `num_experts`,
    `top_k`, each expert's `intermediate_size`, `normalize` (renormalise the top-k routing
    weights), `float32_weights` (routing weights kept float32 into the combine, as Mixtral's
    router; False: rounded to the activations' dtype), `shared_intermediate_size` (a shared
    expert with a sigmoid gate, or None), and `sparse_layers` (per layer: True = experts, False = the dense MLP of the spec's
    `intermediate_size`; None = every layer sparse)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    normalize: bool = True
    float32_weights: bool = False
    shared_intermediate_size: int | None = None
    sparse_layers: tuple[bool, ...] | None = None

    def is_sparse(self, i: int) -> bool:
        return self.sparse_layers is None or self.sparse_layers[i]


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """Every choice that distinguishes a Llama-like family. Defaults are Llama's.

    Sizes: `vocab_size`, `hidden_size`, `intermediate_size`, `num_layers`, `num_heads`,
    `num_kv_heads`, `head_dim`.
    Norms: `norm` (every norm of the model unless overridden), `qk_norm` (None, `"head"`,
    `"full"`) with `qk_norm_spec`; `final_norm`.
    Block: `block`, the layout of every layer (an [`eqxlm.nn.AbstractBlock`][]):
    `PreNorm()` (Llama; `PreNorm(residual_multiplier=...)`: Granite), `Sandwich()` (Gemma 2),
    `PostNorm()` (OLMo-2), `NormResidual()` (BLOOM), `Parallel(norms=1)` (Phi, Cohere) or
    `Parallel(norms=2)` (GPT-NeoX), or a layout of one's own.
    Embeddings: `embedding_scale` (multiplied in the compute dtype: Gemma's
    `sqrt(hidden_size)`; Granite's `embedding_multiplier`), `embedding_norm` (BLOOM),
    `learned_positions` (GPT-2: the number of position embeddings).
    Attention: `positions` (`"rope"`, `"alibi"` or None) with `rope`, and `local_rope` for
    sliding layers (Gemma 3); `qkv_bias`, `o_bias`; `query_scale` (None = `head_dim**-0.5`; a tuple gives one per layer);
    `attn_logit_softcap`; `layer_windows` (per layer: None = full causal, or a window).
    MLP: `mlp` (`"gated"` or `"plain"`), `activation` (an `eqxlm.nn.ACTIVATIONS` name), `mlp_bias`;
    `moe` (a [`MoESpec`][]: mixture-of-experts layers) or None.
    Head: `tie_word_embeddings`, `lm_head_bias`, `final_logit_softcap`, `logit_scale`
    (multiplied: Cohere), `logit_divisor` (divided: Granite's `logits_scaling`, as
    transformers divides; `x / d` and `x * (1 / d)` differ in the last bit).
    `qk_norm="head_weights"` is a per-head norm with its own weights per head, stored
    `(heads, head_dim)` (Cohere's `use_qk_norm`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm: NormSpec
    layer_windows: tuple[int | None, ...]
    qk_norm: str | None = None
    qk_norm_spec: NormSpec | None = None
    block: AbstractBlock = PreNorm()
    final_norm: bool = True
    embedding_scale: float | None = None
    embedding_norm: bool = False
    learned_positions: int | None = None
    positions: str | None = "rope"
    rope: RopeSpec | None = RopeSpec()
    local_rope: RopeSpec | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    query_scale: float | tuple[float, ...] | None = None
    attn_logit_softcap: float | None = None
    mlp: str = "gated"
    activation: str = "silu"
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    lm_head_bias: bool = False
    final_logit_softcap: float | None = None
    logit_scale: float | None = None
    logit_divisor: float | None = None
    initializer_range: float = 0.02
    moe: MoESpec | None = None

    def __post_init__(self):
        if len(self.layer_windows) != self.num_layers:
            raise ValueError(f"DecoderSpec: {len(self.layer_windows)} layer windows for {self.num_layers} layers.")
        activation(self.activation)  # an unsupported name: `UnsupportedActivation`, named by the config's field
        if not callable(getattr(self.block, "make", None)) or type(self.block).__hash__ is None:
            raise TypeError(
                f"DecoderSpec: block must be a block layout (a frozen dataclass with `make`, e.g. eqxlm.nn.PreNorm()), "
                f"got {type(self.block).__name__}."
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"DecoderSpec: num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads}).")
        if self.positions == "rope":  # rope settings the part refuses (longrope factor lengths, ...) fail here, by name
            for rope in (self.rope, self.local_rope):
                if rope is not None:
                    rope.make(self.head_dim)

    @property
    def windows(self) -> tuple[int | None, ...]:
        """The distinct attention kinds, in order of first use (one frame and one slot
        table each)."""
        return tuple(dict.fromkeys(self.layer_windows))


def _init_normal(module, std: float, key: PRNGKeyArray):
    """Hugging Face's initialisation: every `Linear` and `Embedding` weight from
    `N(0, std)` (HF `initializer_range`), biases zero; norms keep their ones/zeros."""
    is_param = lambda x: isinstance(x, (eqx.nn.Linear, eqx.nn.Embedding))  # noqa: E731
    nodes = lambda m: [x for x in jax.tree.leaves(m, is_leaf=is_param) if is_param(x)]  # noqa: E731
    found = nodes(module)
    if not found:
        return module
    keys = jax.random.split(key, len(found))
    draw = lambda k, n: (std * jax.random.normal(k, n.weight.shape, jnp.float32)).astype(n.weight.dtype)  # noqa: E731
    weights = [draw(k, n) for k, n in zip(keys, found, strict=True)]
    module = eqx.tree_at(lambda m: [n.weight for n in nodes(m)], module, weights)
    biased = lambda m: [n.bias for n in nodes(m) if isinstance(n, eqx.nn.Linear) and n.bias is not None]  # noqa: E731
    return eqx.tree_at(biased, module, [jnp.zeros_like(b) for b in biased(module)])


def make_layer(spec: DecoderSpec, i: int, dtype, key: PRNGKeyArray) -> AbstractDecoderLayer:
    """Layer `i` of `spec`, initialised as transformers initialises."""
    k_attn, k_mlp, k_init = jax.random.split(key, 3)
    window = spec.layer_windows[i]
    if spec.positions == "rope":
        rope = spec.local_rope if (window is not None and spec.local_rope is not None) else spec.rope
        scheme = rope.make(spec.head_dim)
    elif spec.positions == "alibi":
        scheme = ALiBi(spec.num_heads)
    else:
        scheme = None
    qk_spec = spec.qk_norm_spec or spec.norm
    attn = Attention(
        spec.hidden_size,
        spec.num_heads,
        spec.num_kv_heads,
        spec.head_dim,
        qkv_bias=spec.qkv_bias,
        o_bias=spec.o_bias,
        position_scheme=scheme,
        sliding_window=window,
        scale=spec.query_scale[i] if isinstance(spec.query_scale, tuple) else spec.query_scale,
        logit_softcap=spec.attn_logit_softcap,
        qk_norm=spec.qk_norm,
        make_norm=lambda size: qk_spec.make(size, dtype),
        dtype=dtype,
        key=k_attn,
    )
    mlp_cls = GatedMLP if spec.mlp == "gated" else MLP
    if spec.moe is not None and spec.moe.is_sparse(i):
        moe = spec.moe
        mlp = SparseMoE(
            spec.hidden_size,
            moe.intermediate_size,
            moe.num_experts,
            moe.top_k,
            normalize=moe.normalize,
            float32_weights=moe.float32_weights,
            shared_intermediate_size=moe.shared_intermediate_size,
            activation=activation(spec.activation),
            dtype=dtype,
            key=k_mlp,
        )
    else:
        mlp = mlp_cls(
            spec.hidden_size,
            spec.intermediate_size,
            use_bias=spec.mlp_bias,
            activation=activation(spec.activation),
            dtype=dtype,
            key=k_mlp,
        )
    layer = spec.block.make(attn, mlp, lambda: spec.norm.make(spec.hidden_size, dtype))
    return _init_normal(layer, spec.initializer_range, k_init)


@typecheck
def resolve_positions(
    input_ids: Int[Array, " seq"],
    attention_mask: Int[Array, " seq"] | Bool[Array, " seq"] | None,
    positions: Int[Array, " seq"] | None,
    cache: Cache | None,
) -> tuple[Bool[Array, " seq"], Int[Array, " seq"]]:
    """`valid` (False at padding) and position ids. Without explicit `positions`,
    positions count real tokens only (`cumsum(mask) - 1`, continuing from the cache), so
    a left-padded row gives the same numbers as the unpadded one."""
    valid = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
    if positions is None:
        start = jnp.zeros((), jnp.int32) if cache is None else cache.next_position
        counted = start + jnp.cumsum(valid, dtype=jnp.int32) - 1
        positions = jnp.where(valid, counted, 0)
    return valid, positions


@typecheck
def embed(embedding: eqx.Module, input_ids: Int[Array, " seq"], what: str = "token id") -> Float[Array, "seq hidden"]:
    """Look up embeddings in `embedding` (an `eqx.nn.Embedding`, or an `eqxlm.inspect` hook
    around one); an id outside the table is an error (never clamped)."""
    size = embedding.weight.shape[0]
    input_ids = eqx.error_if(input_ids, jnp.any((input_ids < 0) | (input_ids >= size)), f"{what} out of range [0, {size})")
    if isinstance(embedding, AbstractSequenceWise):  # a hook: it captures / patches the looked-up vectors
        return embedding(input_ids)
    return embedding.weight[input_ids]


def _refuse_longrope_switch(spec: DecoderSpec, positions, cache: Cache):
    """A cached call that crosses `original_max_position_embeddings` under `longrope` is an
    error: transformers then re-encodes the whole sequence with `long_factor`
    (`Phi3ForCausalLM.prepare_inputs_for_generation` drops the cache), while the cached keys
    here were rotated with `short_factor`. Prefill past the switch point instead."""
    for rope in (spec.rope, spec.local_rope) if spec.positions == "rope" else ():
        scaling = None if rope is None else rope.scaling
        if scaling is None or scaling.rope_type != "longrope":
            continue
        before = cache.next_position
        crossing = (before > 0) & (before <= scaling.original_max_position_embeddings) & longrope_uses_long(scaling, positions)
        positions = eqx.error_if(
            positions,
            crossing,
            "longrope: a cached call crossing original_max_position_embeddings "
            f"({scaling.original_max_position_embeddings}) is refused (transformers re-encodes the whole sequence "
            "with long_factor there); run the sequence past that length without the cache",
        )
    return positions


class Decoder(eqx.Module):
    """The decoder without its head (transformers' `LlamaModel`, `BloomModel`, ...):
    embeddings, the layers (unrolled, or scanned: a [`LayerStack`][]), the final norm."""

    embed_tokens: eqx.nn.Embedding
    embed_positions: eqx.nn.Embedding | None
    embed_norm: RMSNorm | LayerNorm | None
    layers: tuple[AbstractDecoderLayer, ...] | LayerStack
    norm: RMSNorm | LayerNorm | None
    spec: DecoderSpec = eqx.field(static=True)

    def __init__(self, spec: DecoderSpec, *, key: PRNGKeyArray, dtype=jnp.float32, scan_layers: bool = False):
        k_embed, k_pos, k_layers = jax.random.split(key, 3)
        std = spec.initializer_range
        self.embed_tokens = _init_normal(
            eqx.nn.Embedding(spec.vocab_size, spec.hidden_size, dtype=dtype, key=k_embed), std, k_embed
        )
        self.embed_positions = (
            None
            if spec.learned_positions is None
            else _init_normal(eqx.nn.Embedding(spec.learned_positions, spec.hidden_size, dtype=dtype, key=k_pos), std, k_pos)
        )
        self.embed_norm = spec.norm.make(spec.hidden_size, dtype) if spec.embedding_norm else None
        keys = list(jax.random.split(k_layers, spec.num_layers))
        build = lambda i, k: make_layer(spec, i, dtype, k)  # noqa: E731
        self.layers = LayerStack.build(build, keys) if scan_layers else tuple(build(i, k) for i, k in enumerate(keys))
        self.norm = spec.norm.make(spec.hidden_size, dtype) if spec.final_norm else None
        self.spec = spec

    @typecheck
    def __call__(
        self,
        input_ids: Int[Array, " seq"],
        attention_mask: Int[Array, " seq"] | Bool[Array, " seq"] | None = None,
        positions: Int[Array, " seq"] | None = None,
        cache: Cache | None = None,
        *,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> ModelOutput:
        """**Arguments:** `input_ids` (one sequence); `attention_mask` (1 = real token);
        `positions` (default: real tokens counted, continuing from `cache`); `cache` (from
        `init_cache`); `output_hidden_states`, `output_attentions`.
        **Returns:** a [`ModelOutput`][]."""
        spec = self.spec
        valid, positions = resolve_positions(input_ids, attention_mask, positions, cache)
        if cache is not None:
            positions = _refuse_longrope_switch(spec, positions, cache)
        x = embed(self.embed_tokens, input_ids)
        if spec.embedding_scale is not None:  # a float32 scalar cast to the compute dtype, as transformers does
            x = x * jnp.asarray(spec.embedding_scale, jnp.float32).astype(x.dtype)
        if self.embed_positions is not None:
            x = x + embed(self.embed_positions, positions, "position id")
        if self.embed_norm is not None:
            x = each_token(self.embed_norm, x)
        embedded = x
        frames, cache = attention_frames(spec.windows, positions, valid, cache)
        frame_of = dict(zip(spec.windows, frames, strict=True))

        def call(layer, x, layer_cache):
            inner = getattr(layer, "layer", layer)  # through a `training.Remat` wrapper
            frame = frame_of[inner.self_attn.sliding_window]
            return layer(x, frame, layer_cache, return_weights=output_attentions)

        collect = output_hidden_states or output_attentions
        x, outs, weights, layer_caches = run_layers(
            self.layers, x, call, None if cache is None else cache.layers, collect=collect
        )
        if self.norm is not None:
            x = each_token(self.norm, x)
        return ModelOutput(
            last_hidden_state=x,
            hidden_states=(embedded, *outs[:-1], x) if output_hidden_states else None,
            attentions=tuple(weights) if output_attentions else None,
            cache=None if cache is None else eqx.tree_at(lambda c: c.layers, cache, layer_caches),
        )

    @property
    def num_layers(self) -> int:
        return self.layers.num_layers if isinstance(self.layers, LayerStack) else len(self.layers)


class DecoderLM(AbstractCausalLM):
    """A causal LM built from a family config's [`DecoderSpec`][] (final class).

    `model` is the [`Decoder`][]; `lm_head` is None when the embeddings are tied.

        model = eqxlm.DecoderLM(eqxlm.MistralConfig(...), key=jax.random.key(0))
        model = eqxlm.DecoderLM(config, key=key, scan_layers=True)   # layers under lax.scan
    """

    model: Decoder
    lm_head: eqx.nn.Linear | None
    config: Any = eqx.field(static=True)
    generation_config: GenerationConfig | None = eqx.field(static=True, default=None)
    remat_types: ClassVar[tuple[type, ...]] = (AbstractDecoderLayer,)

    def __init__(
        self,
        config,
        *,
        key: PRNGKeyArray,
        dtype=jnp.float32,
        scan_layers: bool = False,
        generation_config: GenerationConfig | None = None,
    ):
        """Random initialisation from a family `config`, as transformers initialises.

        **Arguments:** `config` (any registered family's config); `key`; `dtype` of the
        weights; `scan_layers` (stack the layers and run them with `jax.lax.scan`: compile
        time flat in depth; see the README for when it is faster); `generation_config`."""
        config.check_spec()
        check_constructor(DecoderLM, config, key=key, dtype=dtype, scan_layers=scan_layers)  # fail at once if it cannot fit
        spec = config.decoder_spec()
        k_model, k_head = jax.random.split(key)
        self.model = Decoder(spec, key=k_model, dtype=dtype, scan_layers=scan_layers)
        head = None
        if not spec.tie_word_embeddings:
            head = make_linear(spec.hidden_size, spec.vocab_size, spec.lm_head_bias, dtype, k_head)
            head = _init_normal(head, spec.initializer_range, k_head)
        self.lm_head = head
        self.config = config
        self.generation_config = generation_config

    @property
    def base_model(self) -> Decoder:
        return self.model

    @typecheck
    def logits(self, hidden: Float[Array, "seq hidden"]) -> Float[Array, "seq vocab"]:
        """The head alone: the tied embedding or `lm_head`, then the family's logit
        scaling / soft-capping."""
        spec = self.model.spec
        if self.lm_head is None:
            table = self.model.embed_tokens.weight  # tied: the head is the table, in a projection's product form
            logits = times_weight(hidden, table).astype(jnp.result_type(hidden, table))
        else:
            logits = linear(self.lm_head, hidden)
        if spec.logit_scale is not None:
            logits = logits * jnp.asarray(spec.logit_scale, logits.dtype)
        if spec.logit_divisor is not None:
            logits = logits / jnp.asarray(spec.logit_divisor, logits.dtype)
        if spec.final_logit_softcap is not None:
            cap = jnp.asarray(spec.final_logit_softcap, logits.dtype)
            logits = jnp.tanh(logits / cap) * cap
        return logits

    def init_cache(self, max_length: int, *, dtype=None) -> Cache:
        """An empty cache for sequences up to `max_length` tokens (padding included):
        full-attention layers get `max_length` entries, sliding-window layers a rolling
        buffer of their window when it is shorter."""
        spec = self.model.spec
        dtype = self.model.embed_tokens.weight.dtype if dtype is None else dtype

        def size(window):
            return window if window is not None and window < max_length else max_length

        per_layer = [KVCache.init(size(w), spec.num_kv_heads, spec.head_dim, dtype=dtype) for w in spec.layer_windows]
        layers = self.model.layers
        kv = regroup(per_layer, layers.layout) if isinstance(layers, LayerStack) else tuple(per_layer)
        tables = tuple(SlotTable.init(size(w), rolling=w is not None and w < max_length) for w in spec.windows)
        zero = jnp.zeros((), jnp.int32)
        return Cache(layers=kv, tables=tables, end=zero, next_position=zero, windows=spec.windows)

    def key_map(self):
        return self.config.key_map()

    def partition_rules(self):
        return self.config.partition_rules()
