"""Mixtral: Mistral's attention (grouped-query, optional sliding window) with a sparse
mixture-of-experts MLP in every layer: softmax over all experts in float32, top-k,
renormalised to sum to one, the weights left float32 (`MixtralTopKRouter`). Checkpoints name the block
`block_sparse_moe` and the expert projections `w1` (gate), `w3` (up), `w2` (down), one
tensor per expert."""

import dataclasses
from typing import ClassVar

from ..nn import RopeScaling
from ..params import KeyMap
from ._builder import DecoderSpec, MoESpec, NormSpec
from ._config import BaseConfig, ConfigError
from ._registry import register


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixtralConfig(BaseConfig):
    """Mixtral's configuration (`transformers.MixtralConfig` names and defaults).
    `router_aux_loss_coef` is read by `eqxlm.training.load_balancing_loss` users."""

    model_type: ClassVar[str] = "mixtral"
    architecture: ClassVar[str] = "MixtralForCausalLM"
    features: ClassVar[str] = (
        "sparse experts (softmax, top-k, renormalised), stacked experts with per-expert "
        "`w1`/`w2`/`w3` checkpoint tensors, optional sliding window"
    )
    refused: ClassVar[str] = "other `rope_type`s"
    ignored_fields: ClassVar[dict[str, str]] = {
        "output_router_logits": "a runtime switch of transformers' forward (the aux loss is a training helper here)",
        "router_jitter_noise": "multiplicative noise applied only in transformers' training mode",
    }

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1000000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    num_experts_per_tok: int = 2
    num_local_experts: int = 8
    router_aux_loss_coef: float = 0.001

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_local_experts={self.num_local_experts}]."
            )

    def decoder_spec(self) -> DecoderSpec:
        return DecoderSpec(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads,
            num_kv_heads=self.kv_heads,
            head_dim=self.head_dim or self.hidden_size // self.num_attention_heads,
            norm=NormSpec("rms", self.rms_norm_eps),
            layer_windows=(self.sliding_window,) * self.num_hidden_layers,
            rope=self.rope_spec(),
            activation=self.hidden_act,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
            moe=MoESpec(
                self.num_local_experts, self.num_experts_per_tok, self.intermediate_size, normalize=True, float32_weights=True
            ),
        )

    def key_map(self) -> KeyMap:
        return KeyMap(
            renames=(
                (r"(^|\.)mlp\.experts\.(\d+)\.gate_proj\.", r"\1block_sparse_moe.experts.\2.w1."),
                (r"(^|\.)mlp\.experts\.(\d+)\.up_proj\.", r"\1block_sparse_moe.experts.\2.w3."),
                (r"(^|\.)mlp\.experts\.(\d+)\.down_proj\.", r"\1block_sparse_moe.experts.\2.w2."),
                (r"(^|\.)mlp\.gate\.", r"\1block_sparse_moe.gate."),
            )
        )


register(MixtralConfig)
