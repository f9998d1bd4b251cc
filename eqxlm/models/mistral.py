"""Mistral: Llama's layout with a sliding-window attention mask and no projection biases.

`sliding_window: null` (Mistral v0.2+) means full causal attention.
"""

import dataclasses
from typing import ClassVar

from ..nn import RopeScaling
from ._builder import DecoderSpec, NormSpec
from ._config import BaseConfig
from ._registry import register


@dataclasses.dataclass(frozen=True, kw_only=True)
class MistralConfig(BaseConfig):
    """Mistral's configuration (`transformers.MistralConfig` names and defaults).

    `sliding_window` (default 4096; null = none); no `attention_bias` / `mlp_bias`
    (transformers' Mistral has no biases, so eqxlm refuses a config that asks for them).
    """

    model_type: ClassVar[str] = "mistral"
    architecture: ClassVar[str] = "MistralForCausalLM"
    features: ClassVar[str] = "Llama's layout with a sliding window (`i - W < j <= i`; `null` = none), rolling O(window) cache"
    refused: ClassVar[str] = "other `rope_type`s"

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = 4096

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
            layer_windows=(self.sliding_window,) * self.num_hidden_layers,
            rope=self.rope_spec(),
            activation=self.hidden_act,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
        )


register(MistralConfig)
