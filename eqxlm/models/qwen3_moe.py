"""Qwen3-MoE: Qwen3 attention (RMSNorm over each head of q and k before rotary, free
`head_dim`, optional `attention_bias`, one sliding window on every layer when
`use_sliding_window`) with sparse mixture-of-experts MLPs: softmax, top-k, renormalised only
when `norm_topk_prob`; experts of `moe_intermediate_size`. A layer is sparse unless it is in
`mlp_only_layers` or `(i + 1) % decoder_sparse_step != 0`; the others have a dense MLP of
`intermediate_size` (`Qwen3MoeDecoderLayer.__init__`)."""

import dataclasses
from typing import Any, ClassVar

from ..nn import RopeScaling
from ._builder import DecoderSpec, MoESpec, NormSpec
from ._config import BaseConfig, ConfigError
from ._registry import register


def sparse_layers(num_layers: int, num_experts: int, step: int, mlp_only: tuple[int, ...]) -> tuple[bool, ...]:
    """Which layers hold experts, as `Qwen3MoeDecoderLayer` / `Qwen2MoeDecoderLayer` decide."""
    return tuple(i not in mlp_only and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen3MoeConfig(BaseConfig):
    """Qwen3-MoE's configuration (`transformers.Qwen3MoeConfig` names and defaults)."""

    model_type: ClassVar[str] = "qwen3_moe"
    architecture: ClassVar[str] = "Qwen3MoeForCausalLM"
    features: ClassVar[str] = (
        "per-head q/k RMSNorm before rotary, sparse experts (`norm_topk_prob`), dense MLPs on "
        "`mlp_only_layers` and off the `decoder_sparse_step`"
    )
    refused: ClassVar[str] = "other `rope_type`s"
    hf_names: ClassVar[dict[str, str]] = {"num_experts": "num_local_experts"}  # as transformers writes it
    ignored_fields: ClassVar[dict[str, str]] = {
        "output_router_logits": "a runtime switch of transformers' forward (the aux loss is a training helper here)",
        "max_window_layers": "not read by transformers' Qwen3-MoE model",
    }

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 768
    num_experts_per_tok: int = 8
    num_experts: int = 128
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.001
    mlp_only_layers: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        if not self.use_sliding_window:  # as `Qwen3MoeConfig.__post_init__`
            object.__setattr__(self, "sliding_window", None)
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers or ()))
        if self.decoder_sparse_step < 1:
            raise ConfigError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}.")
        if self.num_experts > 0 and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts={self.num_experts}].")

    @classmethod
    def _normalise(cls, raw: dict[str, Any]) -> dict[str, Any]:
        raw = dict(raw)
        if "num_experts" in raw:  # the field's own name (`attribute_map` alias of `num_local_experts`)
            raw.setdefault("num_local_experts", raw.pop("num_experts"))
        return raw

    def to_hf(self) -> dict[str, Any]:
        out = super().to_hf()
        if out.get("head_dim") is None:  # transformers reads `getattr(config, "head_dim", default)`
            out.pop("head_dim", None)
        return out

    def decoder_spec(self) -> DecoderSpec:
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        return DecoderSpec(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads,
            num_kv_heads=self.kv_heads,
            head_dim=head_dim,
            norm=NormSpec("rms", self.rms_norm_eps),
            qk_norm="head",
            layer_windows=(self.sliding_window,) * self.num_hidden_layers,
            rope=self.rope_spec(),
            qkv_bias=self.attention_bias,
            o_bias=self.attention_bias,
            activation=self.hidden_act,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
            moe=MoESpec(
                self.num_experts,
                self.num_experts_per_tok,
                self.moe_intermediate_size,
                normalize=self.norm_topk_prob,
                sparse_layers=sparse_layers(
                    self.num_hidden_layers, self.num_experts, self.decoder_sparse_step, self.mlp_only_layers
                ),
            ),
        )


register(Qwen3MoeConfig)
