"""Gemma: Llama's layout with RMSNorm scaled by `(1 + weight)` (multiplied in float32),
embeddings scaled by `sqrt(hidden_size)` in the compute dtype, a `gelu_pytorch_tanh` gated
MLP, `head_dim` independent of `hidden_size / heads`, and a tied head.

Quirk reproduced: transformers rewrites the legacy `hidden_act: "gelu"` of the official
releases to `gelu_pytorch_tanh` (`GemmaConfig.__post_init__`); eqxlm reads it the same way.
"""

import dataclasses
import math
from typing import Any, ClassVar

from ..nn import RopeScaling
from ._builder import DecoderSpec, NormSpec
from ._config import BaseConfig, ConfigError
from ._registry import register


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaConfig(BaseConfig):
    """Gemma's configuration (`transformers.GemmaConfig` names and defaults)."""

    model_type: ClassVar[str] = "gemma"
    architecture: ClassVar[str] = "GemmaForCausalLM"
    features: ClassVar[str] = (
        "`(1 + w)` RMSNorm in float32, `sqrt(hidden)` embedding scale in the compute dtype, "
        "GeGLU (`gelu` read as `gelu_pytorch_tanh`), free `head_dim`, tied head"
    )
    refused: ClassVar[str] = "`use_bidirectional_attention`"

    vocab_size: int = 256000
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 256
    hidden_act: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    use_bidirectional_attention: bool | None = None
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: tuple[int, ...] | None = (1,)
    pad_token_id: int | None = 0

    def __post_init__(self):
        super().__post_init__()
        if self.use_bidirectional_attention:
            raise ConfigError(
                "use_bidirectional_attention: true (an encoder-style Gemma) is not supported by eqxlm's causal models."
            )

    @classmethod
    def _normalise(cls, raw: dict[str, Any]) -> dict[str, Any]:
        raw = dict(raw)
        if "hidden_activation" in raw:  # transformers 4's name
            raw["hidden_act"] = raw.pop("hidden_activation") or raw.get("hidden_act", "gelu_pytorch_tanh")
        if raw.get("hidden_act") == "gelu":  # legacy value of the official releases, meant as the tanh approximation
            raw["hidden_act"] = "gelu_pytorch_tanh"
        return raw

    def decoder_spec(self) -> DecoderSpec:
        return DecoderSpec(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads,
            num_kv_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            norm=NormSpec("rms", self.rms_norm_eps, unit_offset=True, weight_in_float32=True),
            layer_windows=(None,) * self.num_hidden_layers,
            embedding_scale=math.sqrt(self.hidden_size),
            rope=self.rope_spec(),
            qkv_bias=self.attention_bias,
            o_bias=self.attention_bias,
            activation=self.hidden_act,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
        )


register(GemmaConfig)
