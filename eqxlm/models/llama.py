"""Llama: embeddings -> N x (RMSNorm, rotary GQA attention, RMSNorm, SwiGLU) -> RMSNorm -> head.

The builder's defaults are Llama's, so the spec only passes the config's numbers through,
and the key map is the identity.
"""

import dataclasses
from typing import ClassVar

from ..nn import RopeScaling
from ._builder import DecoderSpec, NormSpec
from ._config import BaseConfig
from ._registry import register


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(BaseConfig):
    """Llama's configuration, with `transformers.LlamaConfig`'s field names and defaults.

    `rope_theta` / `rope_scaling` are read from either transformers 4's fields or
    transformers 5's `rope_parameters`, and written back as `rope_parameters`.
    `head_dim` None means `hidden_size // num_attention_heads`; `num_key_value_heads`
    None means `num_attention_heads`.
    """

    model_type: ClassVar[str] = "llama"
    architecture: ClassVar[str] = "LlamaForCausalLM"
    features: ClassVar[str] = (
        "RMSNorm, rotary (`default`, `linear`, `llama3`, `yarn`, `longrope` scaling), grouped-query attention, "
        "SwiGLU; optional `attention_bias`/`mlp_bias`, tied head"
    )
    refused: ClassVar[str] = "other `rope_type`s, `quantization_config`"
    ignored_fields: ClassVar[dict[str, str]] = {
        "pretraining_tp": "transformers 5's Llama ignores it (the sliced projections of transformers 4 are gone)",
    }

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    mlp_bias: bool = False

    def decoder_spec(self) -> DecoderSpec:
        return DecoderSpec(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads,
            num_kv_heads=self.kv_heads,
            head_dim=self.dim_per_head,
            norm=NormSpec("rms", self.rms_norm_eps),
            layer_windows=(None,) * self.num_hidden_layers,
            rope=self.rope_spec(),
            qkv_bias=self.attention_bias,
            o_bias=self.attention_bias,
            activation=self.hidden_act,
            mlp_bias=self.mlp_bias,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
        )


register(LlamaConfig)
