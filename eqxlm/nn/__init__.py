"""eqxlm's parts: every layer the models are composed of, each usable on its own.

| file | parts |
|---|---|
| `_norm.py` | `RMSNorm` (Llama / Gemma / OLMo numerics), `LayerNorm` (with or without bias) |
| `_activations.py` | `ACTIVATIONS` by transformers' `ACT2FN` name, `bloom_gelu`, `gelu_new`, ... |
| `_mlp.py` | `GatedMLP` (SwiGLU / GeGLU), `MLP` (plain two-layer) |
| `_positions.py` | `AbstractPositionScheme`: rotate queries/keys, or bias scores |
| `_rotary.py` | `RotaryEmbedding` (rotate-half or interleaved, partial), `RopeScaling` and its subclass per `rope_type` |
| `_alibi.py` | `ALiBi`, `alibi_slopes` |
| `_masks.py` | `causal_mask`, `sliding_window_mask`, `padding_mask`, `attention_mask` |
| `_kv_cache.py` | `KVCache` (one layer), `SlotTable` (one attention kind), `Cache` (a model's) |
| `_attention.py` | `dot_product_attention`, `AttentionFrame`, `attention_frames`, `Attention` |
| `_decoder.py` | `SequentialLayer`, `NormResidualLayer`, `ParallelLayer`; their block layouts `PreNorm`, `Sandwich`, ... |
| `_stack.py` | `LayerStack` (scanned layers), `run_layers`, `plan_segments` |
| `_moe.py` | `SparseMoE` (router, stacked experts, gather / grouped / dense dispatch), `route` |
| `_kinds.py` | `AbstractSequenceWise`, `AbstractTokenAxes`, `AbstractTransparent`, `AbstractStacked`, `AbstractTapped` |
| `_taps.py` | `tap`: a part's internal point for `eqxlm.inspect` |
| `_linear.py` | `linear`, `project`, `make_linear`, `matmul`, `einsum` (around `eqx.nn.Linear`; float32 accumulation) |
"""

from ._activations import ACTIVATIONS, bloom_gelu, gelu_exact, gelu_fast, gelu_new, gelu_tanh
from ._alibi import ALiBi, alibi_slopes
from ._attention import Attention, AttentionFrame, attention_frames, dot_product_attention
from ._decoder import (
    AbstractBlock,
    AbstractDecoderLayer,
    NormResidual,
    NormResidualLayer,
    Parallel,
    ParallelLayer,
    PostNorm,
    PreNorm,
    Sandwich,
    SequentialLayer,
    feed_forward,
)
from ._kinds import AbstractSequenceWise, AbstractStacked, AbstractTapped, AbstractTokenAxes, AbstractTransparent
from ._kv_cache import Cache, CacheWrite, KVCache, SlotTable
from ._linear import einsum, linear, make_linear, matmul, project
from ._masks import attention_mask, causal_mask, padding_mask, sliding_window_mask
from ._mlp import MLP, GatedMLP
from ._moe import SparseMoE, route
from ._norm import LayerNorm, RMSNorm
from ._positions import AbstractPositionScheme
from ._rotary import (
    ROPE_TYPES,
    LinearScaling,
    Llama3Scaling,
    LongRopeScaling,
    RopeScaling,
    RotaryEmbedding,
    YarnScaling,
    register_rope_type,
    rope_inverse_frequencies,
    rope_scaling_from_hf,
)
from ._stack import LayerStack, plan_segments, regroup, run_layers
from ._taps import tap

__all__ = [
    "ACTIVATIONS",
    "ALiBi",
    "AbstractBlock",
    "AbstractDecoderLayer",
    "AbstractPositionScheme",
    "AbstractSequenceWise",
    "AbstractStacked",
    "AbstractTapped",
    "AbstractTokenAxes",
    "AbstractTransparent",
    "Attention",
    "AttentionFrame",
    "Cache",
    "CacheWrite",
    "GatedMLP",
    "KVCache",
    "LayerNorm",
    "LayerStack",
    "LinearScaling",
    "Llama3Scaling",
    "LongRopeScaling",
    "MLP",
    "NormResidual",
    "NormResidualLayer",
    "Parallel",
    "ParallelLayer",
    "PostNorm",
    "PreNorm",
    "RMSNorm",
    "ROPE_TYPES",
    "RopeScaling",
    "RotaryEmbedding",
    "Sandwich",
    "SequentialLayer",
    "SlotTable",
    "SparseMoE",
    "YarnScaling",
    "alibi_slopes",
    "attention_frames",
    "attention_mask",
    "bloom_gelu",
    "causal_mask",
    "dot_product_attention",
    "einsum",
    "feed_forward",
    "gelu_exact",
    "gelu_fast",
    "gelu_new",
    "gelu_tanh",
    "linear",
    "make_linear",
    "matmul",
    "padding_mask",
    "plan_segments",
    "project",
    "register_rope_type",
    "regroup",
    "rope_inverse_frequencies",
    "rope_scaling_from_hf",
    "route",
    "run_layers",
    "sliding_window_mask",
    "tap",
]
