"""Qwen3: Qwen3's layout with a per-head RMSNorm on queries and keys before rotary
(`q_norm`/`k_norm` over `head_dim`), `head_dim` independent of `hidden_size / heads`, one
`attention_bias` switch for q/k/v and o, and sliding-window layers as `layer_types` (or
`use_sliding_window` + `max_window_layers`) says."""

import dataclasses
from typing import Any, ClassVar

from ..nn import RopeScaling
from ._builder import DecoderSpec, NormSpec, RopeSpec
from ._config import BaseConfig, ConfigError, rope_from_hf, rope_to_hf
from ._registry import register

LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen3Config(BaseConfig):
    """Qwen3's configuration (`transformers.Qwen3Config` names and defaults). `layer_types`
    (one of `full_attention` / `sliding_attention` per layer) is derived as transformers
    derives it when absent; `sliding_window` applies to the sliding layers only."""

    model_type: ClassVar[str] = "qwen3"
    architecture: ClassVar[str] = "Qwen3ForCausalLM"
    features: ClassVar[str] = (
        "per-head q/k RMSNorm before rotary, free `head_dim`, optional `attention_bias` (q/k/v and o), "
        "sliding windows on the layers `layer_types` (or `max_window_layers`) marks, tied or untied head"
    )
    refused: ClassVar[str] = "other `rope_type`s"
    hf_fields: ClassVar[dict[str, str]] = {
        name: name
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
            "rope_scaling", "attention_bias", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types",
            "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
        )
    }  # fmt: skip

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    layer_types: tuple[str, ...] | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        if not self.use_sliding_window:  # as `Qwen3Config.__post_init__`
            object.__setattr__(self, "sliding_window", None)
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad or len(self.layer_types) != self.num_hidden_layers:
                raise ConfigError(
                    f"layer_types: expected {self.num_hidden_layers} of {LAYER_TYPES}, got {list(self.layer_types)}."
                )
        if self.num_attention_heads % (self.num_key_value_heads or self.num_attention_heads):
            raise ConfigError(f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads.")

    @classmethod
    def _normalise(cls, raw: dict[str, Any]) -> dict[str, Any]:
        return rope_from_hf(raw)

    def to_hf(self) -> dict[str, Any]:
        out = super().to_hf()
        out["rope_parameters"] = rope_to_hf(out.pop("rope_theta"), out.pop("rope_scaling"))
        out["layer_types"] = list(self.windows_by_layer()[1])
        return out

    def windows_by_layer(self) -> tuple[tuple[int | None, ...], tuple[str, ...]]:
        """Each layer's window and type, as `Qwen3Config.__init__` derives them."""
        window = self.sliding_window
        types = self.layer_types or tuple(
            "sliding_attention" if window is not None and i >= self.max_window_layers else "full_attention"
            for i in range(self.num_hidden_layers)
        )
        return tuple(window if t == "sliding_attention" else None for t in types), types

    def decoder_spec(self) -> DecoderSpec:
        kv_heads = self.num_key_value_heads or self.num_attention_heads
        return DecoderSpec(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads,
            num_kv_heads=kv_heads,
            head_dim=self.head_dim,
            norm=NormSpec("rms", self.rms_norm_eps),
            layer_windows=self.windows_by_layer()[0],
            qk_norm="head",
            rope=RopeSpec(self.rope_theta, self.rope_scaling),
            qkv_bias=self.attention_bias,
            o_bias=self.attention_bias,
            activation=self.hidden_act,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
        )


register(Qwen3Config)
