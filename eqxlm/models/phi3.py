"""Phi-3: Llama's layout with fused projections (`qkv_proj` = `[Q; K; V]` with grouped-query
sizes, `gate_up_proj` = `[gate; up]`, split on import and joined on export), partial rotary
(`partial_rotary_factor`), `longrope` scaling, and a sliding window on every layer when
`sliding_window` is set.

`longrope` as transformers computes it: the inverse frequencies are divided by `short_factor`,
or by `long_factor` for a forward call whose largest position + 1 exceeds
`original_max_position_embeddings` (one choice per call); cos and sin are multiplied by the
attention factor (`attention_factor`, else `sqrt(1 + ln(factor) / ln(original))` with `factor`
defaulting to `max_position_embeddings / original_max_position_embeddings`).

Not reproduced, and refused or documented: transformers re-encodes the whole sequence with the
long factors when generation crosses `original_max_position_embeddings`
(`Phi3ForCausalLM.prepare_inputs_for_generation` drops the cache); eqxlm refuses a cached call
that crosses (an error naming longrope: prefill past that length instead). transformers picks
short or long for a whole batch from its largest position; eqxlm picks per sequence (a row's
numbers equal transformers run on that row alone), so a padded batch whose rows straddle the
switch point differs from transformers' batched call for the shorter rows.
"""

import dataclasses
from typing import Any, ClassVar

from ..nn import RopeScaling
from ..params import Fused, KeyMap
from ._builder import DecoderSpec, NormSpec
from ._config import BaseConfig
from ._registry import register


@dataclasses.dataclass(frozen=True, kw_only=True)
class Phi3Config(BaseConfig):
    """Phi-3's configuration (`transformers.Phi3Config` names and defaults).
    `partial_rotary_factor` is read from `rope_parameters` (or the top level); the legacy rope
    types `su` and `yarn` are read as `longrope`, as `Phi3Config` does; a longrope's
    `original_max_position_embeddings` is the top-level field's (transformers gives it priority)."""

    model_type: ClassVar[str] = "phi3"
    architecture: ClassVar[str] = "Phi3ForCausalLM"
    features: ClassVar[str] = (
        "fused `qkv_proj` (GQA sizes) and `gate_up_proj`, partial rotary, `longrope` (short/long factors "
        "by sequence length, attention factor), sliding window"
    )
    refused: ClassVar[str] = (
        "other `rope_type`s; a cached call crossing `original_max_position_embeddings` under longrope"
    )
    ignored_fields: ClassVar[dict[str, str]] = {
        "resid_pdrop": "dropout: training only",
        "embd_pdrop": "dropout: training only",
    }

    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    partial_rotary_factor: float = 1.0
    sliding_window: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] | None = (32000,)
    pad_token_id: int | None = 32000

    @classmethod
    def _normalise(cls, raw: dict[str, Any]) -> dict[str, Any]:
        raw = dict(raw)
        scaling, params = raw.pop("rope_scaling", None), raw.pop("rope_parameters", None)
        params = dict(scaling or params or {})  # as Phi3Config.convert_rope_params_to_dict
        rope_type = params.pop("rope_type", params.pop("type", "default"))
        params["rope_type"] = "longrope" if rope_type in ("su", "yarn") else rope_type
        if params["rope_type"] == "longrope":
            params["original_max_position_embeddings"] = raw.get("original_max_position_embeddings", 4096)
        raw["rope_parameters"] = params
        return raw

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def decoder_spec(self) -> DecoderSpec:
        return DecoderSpec(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads,
            num_kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            norm=NormSpec("rms", self.rms_norm_eps),
            layer_windows=(self.sliding_window,) * self.num_hidden_layers,
            rope=self.rope_spec(fraction=self.partial_rotary_factor),
            activation=self.hidden_act,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
        )

    def key_map(self) -> KeyMap:
        return KeyMap(
            fused=(
                Fused("qkv_proj", ("q_proj", "k_proj", "v_proj")),
                Fused("gate_up_proj", ("gate_proj", "up_proj")),
            )
        )


register(Phi3Config)
