"""OLMoE: Llama's layout with RMSNorm over the **whole** q and k projections (before the
heads are split and before rotary), and sparse mixture-of-experts MLPs in every layer:
softmax, top-k, not renormalised unless `norm_topk_prob` (`OlmoeTopKRouter`)."""

import dataclasses
from typing import ClassVar

from ..nn import RopeScaling
from ._builder import DecoderSpec, MoESpec, NormSpec
from ._config import BaseConfig, ConfigError
from ._registry import register


@dataclasses.dataclass(frozen=True, kw_only=True)
class OlmoeConfig(BaseConfig):
    """OLMoE's configuration (`transformers.OlmoeConfig` names and defaults). `clip_qkv`
    (clamping q/k/v) is refused: eqxlm's attention has no clamp."""

    model_type: ClassVar[str] = "olmoe"
    architecture: ClassVar[str] = "OlmoeForCausalLM"
    features: ClassVar[str] = (
        "RMSNorm over the whole q and k projections, sparse experts (top-k without renormalisation unless `norm_topk_prob`)"
    )
    refused: ClassVar[str] = "`clip_qkv`, other `rope_type`s"
    ignored_fields: ClassVar[dict[str, str]] = {
        "output_router_logits": "a runtime switch of transformers' forward (the aux loss is a training helper here)",
    }

    vocab_size: int = 50304
    hidden_size: int = 2048
    intermediate_size: int = 2048
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    clip_qkv: float | None = None
    num_experts_per_tok: int = 8
    num_experts: int = 64
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.01
    pad_token_id: int | None = 1
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] | None = (50279,)

    def __post_init__(self):
        super().__post_init__()
        if self.clip_qkv is not None:
            raise ConfigError(f"clip_qkv ({self.clip_qkv}) is not supported by eqxlm (q/k/v clamping); use null.")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts={self.num_experts}].")

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
            qk_norm="full",
            layer_windows=(None,) * self.num_hidden_layers,
            rope=self.rope_spec(),
            qkv_bias=self.attention_bias,
            o_bias=self.attention_bias,
            activation=self.hidden_act,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
            moe=MoESpec(self.num_experts, self.num_experts_per_tok, self.intermediate_size, normalize=self.norm_topk_prob),
        )


register(OlmoeConfig)
