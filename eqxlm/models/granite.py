"""Granite: Llama's layout with four scalars. Embeddings multiplied by `embedding_multiplier`,
the attention scores scaled by `attention_multiplier` (instead of `head_dim ** -0.5`), each
sub-block's output multiplied by `residual_multiplier` before it joins the residual, and
the logits **divided** by `logits_scaling` (as transformers divides; multiplying by the
reciprocal can differ in the last bit). Checkpoint names are Llama's.
"""

import dataclasses
from typing import ClassVar

from ..nn import PreNorm, RopeScaling
from ._builder import DecoderSpec, NormSpec
from ._config import BaseConfig, ConfigError
from ._registry import register


@dataclasses.dataclass(frozen=True, kw_only=True)
class GraniteConfig(BaseConfig):
    """Granite's configuration (`transformers.GraniteConfig` names and defaults).
    `num_key_value_heads` None means `num_attention_heads`."""

    model_type: ClassVar[str] = "granite"
    architecture: ClassVar[str] = "GraniteForCausalLM"
    features: ClassVar[str] = (
        "Llama with `embedding_multiplier`, `attention_multiplier` (the softmax scale), "
        "`residual_multiplier`, logits divided by `logits_scaling`"
    )
    refused: ClassVar[str] = "other `rope_type`s"

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    embedding_multiplier: float = 1.0
    logits_scaling: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.logits_scaling == 0:
            raise ConfigError("logits_scaling: the logits are divided by it; 0 is not allowed.")

    def decoder_spec(self) -> DecoderSpec:
        return DecoderSpec(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads,
            num_kv_heads=self.kv_heads,
            head_dim=self.hidden_size // self.num_attention_heads,
            norm=NormSpec("rms", self.rms_norm_eps),
            layer_windows=(None,) * self.num_hidden_layers,
            rope=self.rope_spec(),
            qkv_bias=self.attention_bias,
            o_bias=self.attention_bias,
            query_scale=float(self.attention_multiplier),
            block=PreNorm(residual_multiplier=float(self.residual_multiplier)),
            embedding_scale=float(self.embedding_multiplier),
            logit_divisor=float(self.logits_scaling),
            activation=self.hidden_act,
            mlp_bias=self.mlp_bias,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
        )


register(GraniteConfig)
