"""Phi (phi-1, phi-1.5, phi-2): a parallel block (attention and MLP both read one LayerNorm of
the input, and both join the residual), partial rotary (`partial_rotary_factor`, default
0.5), biases on every dense layer and on the head (`lm_head.bias`), a plain `gelu_new` MLP,
and optional per-head q/k LayerNorms (`qk_layernorm`).

Checkpoint names: `model.final_layernorm`, `self_attn.dense`, `mlp.fc1`/`mlp.fc2`,
`self_attn.q_layernorm`/`k_layernorm`.
"""

import dataclasses
from typing import ClassVar

from ..nn import Parallel, RopeScaling
from ..params import KeyMap
from ._builder import DecoderSpec, NormSpec
from ._config import BaseConfig, ConfigError
from ._registry import register


@dataclasses.dataclass(frozen=True, kw_only=True)
class PhiConfig(BaseConfig):
    """Phi's configuration (`transformers.PhiConfig` names and defaults). `partial_rotary_factor`
    is read from `rope_parameters` (or the older top-level field)."""

    model_type: ClassVar[str] = "phi"
    architecture: ClassVar[str] = "PhiForCausalLM"
    features: ClassVar[str] = (
        "parallel attention and MLP from one LayerNorm, partial rotary, biases on dense layers and "
        "on the head (`lm_head.bias`), optional per-head q/k LayerNorm (`qk_layernorm`)"
    )
    refused: ClassVar[str] = "other `rope_type`s, `tie_word_embeddings` (a tied head with its own bias)"
    ignored_fields: ClassVar[dict[str, str]] = {
        "resid_pdrop": "dropout: training only",
        "embd_pdrop": "dropout: training only",
    }

    vocab_size: int = 51200
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "gelu_new"
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    partial_rotary_factor: float = 0.5
    qk_layernorm: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.tie_word_embeddings:
            raise ConfigError(
                "tie_word_embeddings: true is not supported for phi (transformers ties lm_head.weight to the "
                "embeddings but keeps lm_head.bias; eqxlm's tied head has no bias)."
            )

    def decoder_spec(self) -> DecoderSpec:
        head_dim = self.hidden_size // self.num_attention_heads
        norm = NormSpec("layer", self.layer_norm_eps)
        return DecoderSpec(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads,
            num_kv_heads=self.kv_heads,
            head_dim=head_dim,
            norm=norm,
            layer_windows=(None,) * self.num_hidden_layers,
            qk_norm="head" if self.qk_layernorm else None,
            qk_norm_spec=norm,
            block=Parallel(norms=1),
            rope=self.rope_spec(fraction=self.partial_rotary_factor),
            qkv_bias=True,
            o_bias=True,
            mlp="plain",
            activation=self.hidden_act,
            mlp_bias=True,
            lm_head_bias=True,
            tie_word_embeddings=False,
            initializer_range=self.initializer_range,
        )

    def key_map(self) -> KeyMap:
        return KeyMap(
            renames=(
                (r"^model\.norm\.", "model.final_layernorm."),
                (r"(^|\.)self_attn\.o_proj\.", r"\1self_attn.dense."),
                (r"(^|\.)self_attn\.q_norm\.", r"\1self_attn.q_layernorm."),
                (r"(^|\.)self_attn\.k_norm\.", r"\1self_attn.k_layernorm."),
                (r"(^|\.)mlp\.up_proj\.", r"\1mlp.fc1."),
                (r"(^|\.)mlp\.down_proj\.", r"\1mlp.fc2."),
            )
        )


register(PhiConfig)
