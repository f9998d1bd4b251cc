"""Gemma 2: Gemma's `(1 + weight)` float32 RMSNorm and `sqrt(hidden_size)` embedding scale,
with four norms per layer (before and after attention, before and after the MLP: the
`Sandwich()` block layout), attention-logit and final-logit soft-capping (`c * tanh(x / c)`),
queries scaled by `query_pre_attn_scalar ** -0.5`, and sliding and global layers as
`layer_types` says (by default sliding on even layers).

Checkpoint names: Gemma 2's `post_attention_layernorm` is the norm on the attention output
(the builder's `attn_out_norm`), its `pre_feedforward_layernorm` the norm before the MLP (the
builder's `post_attention_layernorm`), its `post_feedforward_layernorm` the builder's
`mlp_out_norm`.
"""

import dataclasses
import math
from typing import ClassVar

from ..nn import RopeScaling, Sandwich
from ..params import KeyMap
from ._builder import DecoderSpec, NormSpec
from ._config import BaseConfig, ConfigError
from ._registry import register

#: The builder's (Llama's) names -> Gemma 2's, applied in this order.
SANDWICH_RENAMES = (
    (r"(^|\.)post_attention_layernorm\.", r"\1pre_feedforward_layernorm."),
    (r"(^|\.)attn_out_norm\.", r"\1post_attention_layernorm."),
    (r"(^|\.)mlp_out_norm\.", r"\1post_feedforward_layernorm."),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma2Config(BaseConfig):
    """Gemma 2's configuration (`transformers.Gemma2Config` names and defaults). `layer_types`
    is derived as transformers derives it when absent (sliding on layers 0, 2, 4, ...);
    `sliding_window` applies to the sliding layers only."""

    model_type: ClassVar[str] = "gemma2"
    architecture: ClassVar[str] = "Gemma2ForCausalLM"
    features: ClassVar[str] = (
        "`(1 + w)` RMSNorm in float32, four norms per layer (sandwich), attention-logit and final-logit "
        "soft-capping, `query_pre_attn_scalar` query scale, sliding and global layers per `layer_types`, "
        "`sqrt(hidden)` embedding scale in the compute dtype, GeGLU, free `head_dim`, tied head"
    )
    refused: ClassVar[str] = "`use_bidirectional_attention`, other `rope_type`s"
    ignored_fields: ClassVar[dict[str, str]] = {
        "hidden_act": "not read by Gemma 2's modeling code (it reads `hidden_activation`); old files carry both",
        "cache_implementation": "a generation default of transformers (its hybrid cache), same numbers",
    }
    activation_field: ClassVar[str] = "hidden_activation"

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] | None = None
    final_logit_softcapping: float | None = 30.0
    attn_logit_softcapping: float | None = 50.0
    use_bidirectional_attention: bool | None = None
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: tuple[int, ...] | None = (1,)
    pad_token_id: int | None = 0

    def __post_init__(self):
        super().__post_init__()
        if self.use_bidirectional_attention:
            raise ConfigError(
                "use_bidirectional_attention: true (an encoder-style Gemma 2) is not supported by eqxlm's causal models."
            )

    def layer_slides(self, i: int) -> bool:  # as `Gemma2Config.__post_init__`: even layers
        return bool((i + 1) % 2)

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
            block=Sandwich(),
            layer_windows=self.windows_by_layer(),
            embedding_scale=math.sqrt(self.hidden_size),
            rope=self.rope_spec(),
            qkv_bias=self.attention_bias,
            o_bias=self.attention_bias,
            query_scale=self.query_pre_attn_scalar**-0.5,
            attn_logit_softcap=self.attn_logit_softcapping,
            activation=self.hidden_activation,
            tie_word_embeddings=self.tie_word_embeddings,
            final_logit_softcap=self.final_logit_softcapping,
            initializer_range=self.initializer_range,
        )

    def key_map(self) -> KeyMap:
        return KeyMap(renames=SANDWICH_RENAMES)


register(Gemma2Config)
