"""OLMo-2: Llama's blocks with the norms moved to the outputs: attention and MLP outputs are
normalised before their residual adds and the inputs are not (the `PostNorm()` block layout);
queries and keys are RMS-normalised over the whole projection (all heads at once, before
rotary: `qk_norm="full"`); every RMSNorm multiplies its weight in float32 before casting back
(`Olmo2RMSNorm`).

Checkpoint names: OLMo-2's `post_attention_layernorm` is the norm on the attention output (the
builder's `attn_out_norm`), its `post_feedforward_layernorm` the builder's `mlp_out_norm`.
"""

import dataclasses
from typing import ClassVar

from ..nn import PostNorm, RopeScaling
from ..params import KeyMap
from ._builder import DecoderSpec, NormSpec
from ._config import BaseConfig
from ._registry import register


@dataclasses.dataclass(frozen=True, kw_only=True)
class Olmo2Config(BaseConfig):
    """OLMo-2's configuration (`transformers.Olmo2Config` names and defaults)."""

    model_type: ClassVar[str] = "olmo2"
    architecture: ClassVar[str] = "Olmo2ForCausalLM"
    features: ClassVar[str] = (
        "norms on the attention and MLP outputs only (no input norms), q/k RMSNorm over the whole "
        "projection before rotary, RMSNorm weight multiplied in float32, optional `attention_bias`"
    )
    refused: ClassVar[str] = "other `rope_type`s, `head_dim`"

    vocab_size: int = 50304
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] | None = (50279,)
    pad_token_id: int | None = 1

    def decoder_spec(self) -> DecoderSpec:
        norm = NormSpec("rms", self.rms_norm_eps, weight_in_float32=True)
        return DecoderSpec(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads,
            num_kv_heads=self.kv_heads,
            head_dim=self.hidden_size // self.num_attention_heads,
            norm=norm,
            block=PostNorm(),
            qk_norm="full",
            layer_windows=(None,) * self.num_hidden_layers,
            rope=self.rope_spec(),
            qkv_bias=self.attention_bias,
            o_bias=self.attention_bias,
            activation=self.hidden_act,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
        )

    def key_map(self) -> KeyMap:
        return KeyMap(
            renames=(
                (r"(^|\.)attn_out_norm\.", r"\1post_attention_layernorm."),
                (r"(^|\.)mlp_out_norm\.", r"\1post_feedforward_layernorm."),
            )
        )


register(Olmo2Config)
