"""eqxlm's parts: every layer the models are composed of, each usable on its own.

| file | parts |
|---|---|
| `_norm.py` | `RMSNorm`, `LayerNorm` |
| `_activations.py` | `bloom_gelu` |
| `_mlp.py` | `GatedMLP` (Llama/Mistral), `BloomMLP` |
| `_rotary.py` | `RotaryEmbedding`, `RopeScaling`, `rope_inverse_frequencies` |
| `_alibi.py` | `ALiBi`, `alibi_slopes` |
| `_masks.py` | `causal_mask`, `sliding_window_mask`, `padding_mask`, `attention_mask` |
| `_attention.py` | `dot_product_attention`, `attend`, `Attention`, `BloomAttention` |
| `_kv_cache.py` | `KVCache` |
| `_decoder.py` | `DecoderLayer` (pre-norm), `BloomBlock` |
| `_linear.py` | `linear`, `make_linear` (around `eqx.nn.Linear`) |
"""

from ._activations import bloom_gelu
from ._alibi import ALiBi, alibi_slopes
from ._attention import Attention, BloomAttention, attend, dot_product_attention
from ._decoder import BloomBlock, DecoderLayer
from ._kv_cache import KVCache
from ._linear import linear, make_linear
from ._masks import attention_mask, causal_mask, padding_mask, sliding_window_mask
from ._mlp import BloomMLP, GatedMLP
from ._norm import LayerNorm, RMSNorm
from ._rotary import SUPPORTED_ROPE_TYPES, RopeScaling, RotaryEmbedding, rope_inverse_frequencies

__all__ = [
    "ALiBi",
    "Attention",
    "BloomAttention",
    "BloomBlock",
    "BloomMLP",
    "DecoderLayer",
    "GatedMLP",
    "KVCache",
    "LayerNorm",
    "RMSNorm",
    "RopeScaling",
    "RotaryEmbedding",
    "SUPPORTED_ROPE_TYPES",
    "alibi_slopes",
    "attend",
    "attention_mask",
    "bloom_gelu",
    "causal_mask",
    "dot_product_attention",
    "linear",
    "make_linear",
    "padding_mask",
    "rope_inverse_frequencies",
    "sliding_window_mask",
]
