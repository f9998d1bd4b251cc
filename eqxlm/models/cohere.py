"""Cohere (Command-R): a parallel block (attention and a SwiGLU MLP both read one LayerNorm of
the input), LayerNorm without bias (statistics and weight in float32), rotary applied to
interleaved pairs `(x[2i], x[2i+1])`, optional q/k LayerNorms with one weight per head
(`use_qk_norm`, stored `(heads, head_dim)`), logits multiplied by `logit_scale`, a tied head.
Checkpoint names are Llama's.
"""

import dataclasses
from typing import ClassVar

from ..nn import Parallel, RopeScaling
from ..params import DEFAULT_RULES
from ._builder import DecoderSpec, NormSpec
from ._config import BaseConfig
from ._registry import register


@dataclasses.dataclass(frozen=True, kw_only=True)
class CohereConfig(BaseConfig):
    """Cohere's configuration (`transformers.CohereConfig` names and defaults; `rope_theta`
    defaults to 500000 as `CohereConfig.default_theta`)."""

    model_type: ClassVar[str] = "cohere"
    architecture: ClassVar[str] = "CohereForCausalLM"
    features: ClassVar[str] = (
        "parallel attention and MLP from one bias-free LayerNorm, interleaved rotary, "
        "per-head-weighted q/k LayerNorms (`use_qk_norm`), logits times `logit_scale`, tied head"
    )
    refused: ClassVar[str] = "other `rope_type`s"

    vocab_size: int = 256000
    hidden_size: int = 8192
    intermediate_size: int = 22528
    logit_scale: float | None = 0.0625
    num_hidden_layers: int = 40
    num_attention_heads: int = 64
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    layer_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    use_qk_norm: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 5
    eos_token_id: tuple[int, ...] | None = (255001,)
    pad_token_id: int | None = 0

    def decoder_spec(self) -> DecoderSpec:
        norm = NormSpec("layer", self.layer_norm_eps, bias=False)
        return DecoderSpec(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads,
            num_kv_heads=self.kv_heads,
            head_dim=self.hidden_size // self.num_attention_heads,
            norm=norm,
            layer_windows=(None,) * self.num_hidden_layers,
            qk_norm="head_weights" if self.use_qk_norm else None,
            qk_norm_spec=norm,
            block=Parallel(norms=1),
            rope=self.rope_spec(interleaved=True),
            qkv_bias=self.attention_bias,
            o_bias=self.attention_bias,
            activation=self.hidden_act,
            tie_word_embeddings=self.tie_word_embeddings,
            logit_scale=None if self.logit_scale is None else float(self.logit_scale),
            initializer_range=self.initializer_range,
        )

    def partition_rules(self):
        """The default rules, plus the per-head q/k norm weights `(heads, head_dim)`: replicated."""
        return ((r"(q_norm|k_norm)\.weight$", (None, None)), *DEFAULT_RULES)


register(CohereConfig)
