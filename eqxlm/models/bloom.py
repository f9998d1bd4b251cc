"""BLOOM: embeddings -> LayerNorm -> N x (LayerNorm, ALiBi attention, LayerNorm, 4h GELU MLP) -> LayerNorm -> tied head.

Builder choices: LayerNorm everywhere, an embedding LayerNorm, ALiBi, biases on every
projection, a plain MLP with BLOOM's GELU, the `NormResidual()` block layout for
`apply_residual_connection_post_layernorm`. Key map: `transformer.h.{i}.self_attention`,
the fused `query_key_value` interleaved per head, `dense_h_to_4h`/`dense_4h_to_h`; files
saved from `BloomModel` lack the `transformer.` prefix (an alias).
"""

import dataclasses
from typing import Any, ClassVar

from ..nn import NormResidual, PreNorm
from ..params import Fused, KeyMap
from ._builder import DecoderSpec, NormSpec
from ._config import BaseConfig, ConfigError
from ._registry import register


@dataclasses.dataclass(frozen=True, kw_only=True)
class BloomConfig(BaseConfig):
    """BLOOM's configuration (`transformers.BloomConfig` names and defaults).

    Aliases read: `n_embed` (old files) and `num_hidden_layers` / `num_attention_heads`.
    `pretraining_tp > 1` is accepted only without `slow_but_exact` (with it, transformers
    changes the summation order of two projections, which eqxlm does not reproduce).
    Ignored (as transformers ignores them): the original Megatron training switches
    `attention_softmax_in_fp32`, `bias_dropout_fusion`, `masked_softmax_fusion`,
    `offset_alibi`, `skip_bias_add`, `skip_bias_add_qkv`, `seq_length`, `n_inner`,
    `unk_token_id`. BLOOM has no position limit (ALiBi).
    """

    model_type: ClassVar[str] = "bloom"
    architecture: ClassVar[str] = "BloomForCausalLM"
    features: ClassVar[str] = (
        "ALiBi (any head count), embedding LayerNorm, fused per-head `query_key_value`, BLOOM GELU, "
        "`apply_residual_connection_post_layernorm`, tied head"
    )
    refused: ClassVar[str] = "`slow_but_exact` with `pretraining_tp > 1`"
    ignored_fields: ClassVar[dict[str, str]] = {
        name: "a switch of the original Megatron training code that transformers' BLOOM ignores"
        for name in (
            "attention_softmax_in_fp32",
            "bias_dropout_fusion",
            "masked_softmax_fusion",
            "offset_alibi",
            "skip_bias_add",
            "skip_bias_add_qkv",
            "seq_length",
            "n_inner",
            "unk_token_id",
        )
    }

    vocab_size: int = 250880
    hidden_size: int = 64
    n_layer: int = 2
    n_head: int = 8
    layer_norm_epsilon: float = 1e-5
    apply_residual_connection_post_layernorm: bool = False
    tie_word_embeddings: bool = True
    pretraining_tp: int = 1
    slow_but_exact: bool = False
    max_position_embeddings: ClassVar[None] = None

    def __post_init__(self):
        super().__post_init__()
        if self.pretraining_tp > 1 and self.slow_but_exact:
            raise ConfigError(
                "slow_but_exact: pretraining_tp > 1 with slow_but_exact=true sums the attention and MLP "
                "output projections in slices; eqxlm does not reproduce that order."
            )
        if self.hidden_size % self.n_head:
            raise ConfigError(f"hidden_size ({self.hidden_size}) must be divisible by n_head ({self.n_head}).")

    @classmethod
    def _normalise(cls, raw: dict[str, Any]) -> dict[str, Any]:
        raw = dict(raw)
        for alias, name in (
            ("n_embed", "hidden_size"),
            ("num_hidden_layers", "n_layer"),
            ("num_attention_heads", "n_head"),
        ):
            if alias in raw:
                value = raw.pop(alias)
                if name in raw and raw[name] != value:
                    raise ConfigError(f"{alias} ({value}) disagrees with {name} ({raw[name]}).")
                raw[name] = value
        return raw

    def decoder_spec(self) -> DecoderSpec:
        return DecoderSpec(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=4 * self.hidden_size,
            num_layers=self.n_layer,
            num_heads=self.n_head,
            num_kv_heads=self.n_head,
            head_dim=self.hidden_size // self.n_head,
            norm=NormSpec("layer", self.layer_norm_epsilon),
            layer_windows=(None,) * self.n_layer,
            block=NormResidual() if self.apply_residual_connection_post_layernorm else PreNorm(),
            embedding_norm=True,
            positions="alibi",
            rope=None,
            qkv_bias=True,
            o_bias=True,
            mlp="plain",
            activation="bloom_gelu",
            mlp_bias=True,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
        )

    def key_map(self) -> KeyMap:
        return KeyMap(
            renames=(
                (r"^model\.embed_tokens\.", "transformer.word_embeddings."),
                (r"^model\.embed_norm\.", "transformer.word_embeddings_layernorm."),
                (r"^model\.norm\.", "transformer.ln_f."),
                (r"^model\.layers\.", "transformer.h."),
                (r"(^|\.)self_attn\.o_proj\.", r"\1self_attention.dense."),
                (r"(^|\.)self_attn\.", r"\1self_attention."),
                (r"(^|\.)mlp\.up_proj\.", r"\1mlp.dense_h_to_4h."),
                (r"(^|\.)mlp\.down_proj\.", r"\1mlp.dense_4h_to_h."),
            ),
            fused=(Fused("query_key_value", ("q_proj", "k_proj", "v_proj"), heads=self.n_head),),
            aliases=((r"^(?!transformer\.|lm_head\.)", "transformer."),),
        )


register(BloomConfig)
