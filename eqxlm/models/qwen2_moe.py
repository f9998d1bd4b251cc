"""Qwen2-MoE: Qwen2 attention (biased q/k/v per `qkv_bias`, unbiased o; sliding windows on
the layers `layer_types` marks) with sparse mixture-of-experts MLPs (softmax, top-k,
renormalised only when `norm_topk_prob`) plus a **shared expert** every token goes through,
scaled by `sigmoid(shared_expert_gate(x))` (`Qwen2MoeSparseMoeBlock.forward`). Layers in
`mlp_only_layers` or off the `decoder_sparse_step` have a dense MLP of `intermediate_size`."""

import dataclasses
from typing import ClassVar

from ..nn import RopeScaling
from ._builder import DecoderSpec, MoESpec, NormSpec
from ._config import BaseConfig, ConfigError
from ._registry import register
from .qwen3_moe import sparse_layers


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen2MoeConfig(BaseConfig):
    """Qwen2-MoE's configuration (`transformers.Qwen2MoeConfig` names and defaults).
    `layer_types` is derived as `Qwen2MoeConfig.__post_init__` derives it when absent."""

    model_type: ClassVar[str] = "qwen2_moe"
    architecture: ClassVar[str] = "Qwen2MoeForCausalLM"
    features: ClassVar[str] = (
        "biased q/k/v, sparse experts (`norm_topk_prob`) plus a shared expert with a sigmoid gate, "
        "dense MLPs on `mlp_only_layers` and off the `decoder_sparse_step`, sliding windows per `layer_types`"
    )
    refused: ClassVar[str] = "other `rope_type`s, sliding layers without a window"
    ignored_fields: ClassVar[dict[str, str]] = {
        "output_router_logits": "a runtime switch of transformers' forward (the aux loss is a training helper here)",
    }

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 16
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 1408
    shared_expert_intermediate_size: int = 5632
    num_experts_per_tok: int = 4
    num_experts: int = 60
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.001
    mlp_only_layers: tuple[int, ...] = ()
    qkv_bias: bool = True
    layer_types: tuple[str, ...] | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers or ()))
        if not self.use_sliding_window:  # as `Qwen2MoeConfig.__post_init__`
            object.__setattr__(self, "sliding_window", 0)
        if self.decoder_sparse_step < 1:
            raise ConfigError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}.")
        if self.num_experts > 0 and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts={self.num_experts}].")
        if "sliding_attention" in self.types_by_layer() and not (self.sliding_window or 0) >= 1:
            raise ConfigError(
                "layer_types: sliding_attention layers need use_sliding_window and a sliding_window >= 1 "
                f"(got use_sliding_window={self.use_sliding_window}, sliding_window={self.sliding_window})."
            )

    def layer_slides(self, i: int) -> bool:  # as `Qwen2MoeConfig.__post_init__`
        return bool((i + 1) % 2 and i < self.max_window_layers and self.use_sliding_window)

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
            layer_windows=self.windows_by_layer(),
            rope=self.rope_spec(),
            qkv_bias=self.qkv_bias,
            activation=self.hidden_act,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
            moe=MoESpec(
                self.num_experts,
                self.num_experts_per_tok,
                self.moe_intermediate_size,
                normalize=self.norm_topk_prob,
                shared_intermediate_size=self.shared_expert_intermediate_size,
                sparse_layers=sparse_layers(
                    self.num_hidden_layers, self.num_experts, self.decoder_sparse_step, self.mlp_only_layers
                ),
            ),
        )


register(Qwen2MoeConfig)
