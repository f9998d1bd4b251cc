"""Qwen2: Llama's layout with biased q/k/v projections (the output projection has none) and
sliding-window attention on the layers the config's `layer_types` marks (older configs:
layers at or above `max_window_layers` when `use_sliding_window` is set)."""

import dataclasses
from typing import ClassVar

from ..nn import RopeScaling
from ._builder import DecoderSpec, NormSpec
from ._config import BaseConfig
from ._registry import register


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen2Config(BaseConfig):
    """Qwen2's configuration (`transformers.Qwen2Config` names and defaults). `layer_types`
    (one of `full_attention` / `sliding_attention` per layer) is derived as transformers
    derives it when absent; `sliding_window` applies to the sliding layers only."""

    model_type: ClassVar[str] = "qwen2"
    architecture: ClassVar[str] = "Qwen2ForCausalLM"
    features: ClassVar[str] = (
        "biased q/k/v with an unbiased o, "
        "sliding windows on the layers `layer_types` (or `max_window_layers`) marks"
    )
    refused: ClassVar[str] = "other `rope_type`s"

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    layer_types: tuple[str, ...] | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        if not self.use_sliding_window:  # as `Qwen2Config.__post_init__`
            object.__setattr__(self, "sliding_window", None)

    def layer_slides(self, i: int) -> bool:  # as `Qwen2Config.__init__`
        return self.sliding_window is not None and i >= self.max_window_layers

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
            qkv_bias=True,
            activation=self.hidden_act,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
        )


register(Qwen2Config)
