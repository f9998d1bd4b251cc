"""GPT-NeoX / Pythia: LayerNorm with bias, partial rotary (`rotary_pct`), a fused
`query_key_value` laid out per head, a plain GELU MLP, an untied head, and a parallel
residual (`use_parallel_residual`, the default) or the sequential one.

Checkpoint names: `gpt_neox.embed_in`, `gpt_neox.layers.{i}.attention.{query_key_value,dense}`,
`mlp.dense_h_to_4h`/`dense_4h_to_h`, `gpt_neox.final_layer_norm`, `embed_out`.
"""

import dataclasses
from typing import Any, ClassVar

from ..nn import Parallel, PreNorm, RopeScaling
from ..params import Fused, KeyMap
from ._builder import DecoderSpec, NormSpec
from ._config import BaseConfig, ConfigError
from ._registry import register


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTNeoXConfig(BaseConfig):
    """GPT-NeoX's configuration (`transformers.GPTNeoXConfig` names and defaults).
    `partial_rotary_factor` is read from `rope_parameters` or the older top-level `rotary_pct`
    (and `rotary_emb_base` as `rope_theta`)."""

    model_type: ClassVar[str] = "gpt_neox"
    architecture: ClassVar[str] = "GPTNeoXForCausalLM"
    features: ClassVar[str] = (
        "parallel residual with two LayerNorms (or sequential), partial rotary (`rotary_pct`), "
        "fused per-head `query_key_value`, untied `embed_out`"
    )
    refused: ClassVar[str] = "other `rope_type`s"
    ignored_fields: ClassVar[dict[str, str]] = {
        "classifier_dropout": "dropout of classification heads: training only",
        "is_decoder": "GPT-NeoX is always causal in transformers' causal LM",
    }

    vocab_size: int = 50432
    hidden_size: int = 6144
    intermediate_size: int = 24576
    num_hidden_layers: int = 44
    num_attention_heads: int = 64
    hidden_act: str = "gelu"
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    partial_rotary_factor: float = 0.25
    attention_bias: bool = True
    use_parallel_residual: bool = True
    bos_token_id: int | None = 0

    def __post_init__(self):
        super().__post_init__()
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})."
            )

    @classmethod
    def _normalise(cls, raw: dict[str, Any]) -> dict[str, Any]:
        raw = dict(raw)  # transformers 4's names (`GPTNeoXConfig` reads a top-level `rotary_pct`, not `partial_rotary_factor`)
        raw["partial_rotary_factor"] = raw.pop("rotary_pct", 0.25)
        if "rotary_emb_base" in raw:
            raw["rope_theta"] = raw.pop("rotary_emb_base")
        return raw

    def decoder_spec(self) -> DecoderSpec:
        heads, head_dim = self.num_attention_heads, self.hidden_size // self.num_attention_heads
        return DecoderSpec(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=head_dim,
            norm=NormSpec("layer", self.layer_norm_eps),
            layer_windows=(None,) * self.num_hidden_layers,
            block=Parallel(norms=2) if self.use_parallel_residual else PreNorm(),
            rope=self.rope_spec(fraction=self.partial_rotary_factor),
            qkv_bias=self.attention_bias,
            o_bias=self.attention_bias,
            mlp="plain",
            activation=self.hidden_act,
            mlp_bias=True,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
        )

    def key_map(self) -> KeyMap:
        return KeyMap(
            renames=(
                (r"^model\.embed_tokens\.", "gpt_neox.embed_in."),
                (r"^model\.norm\.", "gpt_neox.final_layer_norm."),
                (r"^model\.", "gpt_neox."),
                (r"^lm_head\.", "embed_out."),
                (r"(^|\.)self_attn\.o_proj\.", r"\1attention.dense."),
                (r"(^|\.)self_attn\.", r"\1attention."),
                (r"(^|\.)mlp\.up_proj\.", r"\1mlp.dense_h_to_4h."),
                (r"(^|\.)mlp\.down_proj\.", r"\1mlp.dense_4h_to_h."),
            ),
            fused=(Fused("query_key_value", ("q_proj", "k_proj", "v_proj"), heads=self.num_attention_heads),),
            ignored=r"(^|\.)(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias)$",
        )


register(GPTNeoXConfig)
