"""Gemma 3, text only: Gemma 2's layout (`(1 + w)` float32 RMSNorm, four norms per layer,
`query_pre_attn_scalar`, `sqrt(hidden_size)` embedding scale) plus a per-head `(1 + w)`
RMSNorm on queries and keys before rotary; sliding layers rotate with their own parameters
(`rope_parameters["sliding_attention"]`, older files' `rope_local_base_freq`) and global layers
with `rope_parameters["full_attention"]` (older files' `rope_theta` and `rope_scaling`);
the final-logit soft-cap only where configured (`attn_logit_softcapping` is stored but,
in transformers, never applied to the attention scores); by default five sliding
layers to one global (`sliding_window_pattern` 6).
"""

import dataclasses
import math
from typing import Any, ClassVar

from ..nn import RopeScaling, Sandwich
from ..params import KeyMap
from ._builder import DecoderSpec, NormSpec
from ._config import LAYER_TYPES, BaseConfig, ConfigError, rope_from_hf, rope_to_hf
from ._registry import register
from .gemma2 import SANDWICH_RENAMES


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma3TextConfig(BaseConfig):
    """Gemma 3's text configuration (`transformers.Gemma3TextConfig` names and defaults).
    The per-layer-type `rope_parameters` are held as `rope_theta` / `rope_scaling` (global
    layers) and `rope_local_base_freq` / `rope_local_scaling` (sliding layers) and written
    back nested."""

    model_type: ClassVar[str] = "gemma3_text"
    architecture: ClassVar[str] = "Gemma3ForCausalLM"
    features: ClassVar[str] = (
        "Gemma 2's sandwich layout with per-head `(1 + w)` q/k RMSNorm, sliding layers on their own rotary "
        "(`rope_local_base_freq`) and global layers on `rope_theta` with their own scaling, 5:1 "
        "sliding/global `layer_types`, optional final soft-cap (`attn_logit_softcapping` unused, as in "
        "transformers), `query_pre_attn_scalar`, `sqrt(hidden)` embedding scale"
    )
    refused: ClassVar[str] = "`use_bidirectional_attention`, other `rope_type`s"
    ignored_fields: ClassVar[dict[str, str]] = {
        "_sliding_window_pattern": "transformers' record of `sliding_window_pattern`; `layer_types`, written with it, decides",
        "hidden_act": "not read by Gemma 3's modeling code (it reads `hidden_activation`); old files carry both",
        "cache_implementation": "a generation default of transformers (its hybrid cache), same numbers",
        "attn_logit_softcapping": (
            "stored but never applied: `Gemma3Attention.forward` passes no `softcap` to the attention function"
        ),
    }
    activation_field: ClassVar[str] = "hidden_activation"

    vocab_size: int = 262_208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None
    rope_local_base_freq: float = 10_000.0
    rope_local_scaling: RopeScaling | None = None
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] | None = None
    final_logit_softcapping: float | None = None
    use_bidirectional_attention: bool | None = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: tuple[int, ...] | None = (1,)
    pad_token_id: int | None = 0

    def __post_init__(self):
        super().__post_init__()
        if self.use_bidirectional_attention:
            raise ConfigError(
                "use_bidirectional_attention: true (an encoder-style Gemma 3) is not supported by eqxlm's causal models."
            )
        if self.sliding_window is None and "sliding_attention" in self.types_by_layer():
            raise ConfigError("sliding_window: null with sliding_attention layers in layer_types is not supported.")

    @classmethod
    def _normalise(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Derive `layer_types` from a legacy `sliding_window_pattern`."""
        raw = dict(raw)
        pattern = raw.pop("sliding_window_pattern", None)
        if pattern is not None and raw.get("layer_types") is None:
            layers = raw.get("num_hidden_layers", cls.num_hidden_layers)
            raw["layer_types"] = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
        return raw

    @classmethod
    def _rope_from_hf(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Unnest `rope_parameters` as `Gemma3TextConfig.convert_rope_params_to_dict` reads it
        (a legacy `rope_scaling` updates the global layers'; a legacy `rope_theta` /
        `rope_local_base_freq` fills a missing theta)."""
        raw = dict(raw)
        params = raw.pop("rope_parameters", None) or {}
        legacy_scaling = raw.pop("rope_scaling", None)
        theta, local_theta = raw.pop("rope_theta", None), raw.pop("rope_local_base_freq", None)
        if not isinstance(params, dict) or set(params) - set(LAYER_TYPES):
            raise ConfigError(
                f"rope_parameters: Gemma 3 expects one entry per layer type {LAYER_TYPES}, got {params!r}."
            )
        full = dict(params.get("full_attention") or {"rope_type": "default"})
        if legacy_scaling:
            full.update(legacy_scaling)
        full.setdefault("rope_theta", 1_000_000.0 if theta is None else theta)
        local = dict(params.get("sliding_attention") or {"rope_type": "default"})
        local.setdefault("rope_theta", 10_000.0 if local_theta is None else local_theta)
        raw["rope_theta"], raw["rope_scaling"] = rope_from_hf(full)
        raw["rope_local_base_freq"], raw["rope_local_scaling"] = rope_from_hf(local)
        return raw

    def _rope_to_hf(self, out: dict[str, Any]) -> dict[str, Any]:
        out["rope_parameters"] = {
            "full_attention": rope_to_hf(out.pop("rope_theta"), out.pop("rope_scaling")),
            "sliding_attention": rope_to_hf(out.pop("rope_local_base_freq"), out.pop("rope_local_scaling")),
        }
        return out

    def layer_slides(self, i: int) -> bool:  # as `Gemma3TextConfig.__post_init__`: five sliding layers to one global
        return bool((i + 1) % 6)

    def decoder_spec(self) -> DecoderSpec:
        norm = NormSpec("rms", self.rms_norm_eps, unit_offset=True, weight_in_float32=True)
        types = self.types_by_layer()
        return DecoderSpec(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads,
            num_kv_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            norm=norm,
            block=Sandwich(),
            qk_norm="head",
            layer_windows=tuple(self.sliding_window if t == "sliding_attention" else None for t in types),
            embedding_scale=math.sqrt(self.hidden_size),
            rope=self.rope_spec(),
            local_rope=self.rope_spec(self.rope_local_base_freq, self.rope_local_scaling),
            qkv_bias=self.attention_bias,
            o_bias=self.attention_bias,
            query_scale=self.query_pre_attn_scalar**-0.5,
            activation=self.hidden_activation,
            tie_word_embeddings=self.tie_word_embeddings,
            final_logit_softcap=self.final_logit_softcapping,
            initializer_range=self.initializer_range,
        )

    def key_map(self) -> KeyMap:
        return KeyMap(renames=SANDWICH_RENAMES)


register(Gemma3TextConfig)
