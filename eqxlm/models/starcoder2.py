"""StarCoder2: LayerNorm with bias, a plain (non-gated) `gelu_pytorch_tanh` MLP, biases on every
projection (`use_bias`), grouped-query attention with rotary and a sliding window (`null` =
full causal), and a tied head.

Checkpoint names: Llama's, with the MLP as `mlp.c_fc` / `mlp.c_proj`.
"""

import dataclasses
from typing import ClassVar

from ..nn import RopeScaling
from ..params import KeyMap
from ._builder import DecoderSpec, NormSpec
from ._config import BaseConfig
from ._registry import register


@dataclasses.dataclass(frozen=True, kw_only=True)
class Starcoder2Config(BaseConfig):
    """StarCoder2's configuration (`transformers.Starcoder2Config` names and defaults)."""

    model_type: ClassVar[str] = "starcoder2"
    architecture: ClassVar[str] = "Starcoder2ForCausalLM"
    features: ClassVar[str] = (
        "LayerNorm with bias, plain `c_fc`/`c_proj` MLP, biases on every projection (`use_bias`), "
        "grouped-query attention with a sliding window, tied head"
    )
    refused: ClassVar[str] = "other `rope_type`s"
    ignored_fields: ClassVar[dict[str, str]] = {
        "residual_dropout": "dropout: training only",
        "embedding_dropout": "dropout: training only",
    }

    vocab_size: int = 49152
    hidden_size: int = 3072
    intermediate_size: int = 12288
    num_hidden_layers: int = 30
    num_attention_heads: int = 24
    num_key_value_heads: int = 2
    hidden_act: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 4096
    norm_epsilon: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    use_bias: bool = True
    tie_word_embeddings: bool = True
    initializer_range: float = 0.018042
    bos_token_id: int | None = 50256
    eos_token_id: tuple[int, ...] | None = (50256,)

    def decoder_spec(self) -> DecoderSpec:
        return DecoderSpec(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads,
            num_kv_heads=self.num_key_value_heads,
            head_dim=self.hidden_size // self.num_attention_heads,
            norm=NormSpec("layer", self.norm_epsilon),
            layer_windows=(self.sliding_window,) * self.num_hidden_layers,
            rope=self.rope_spec(),
            qkv_bias=self.use_bias,
            o_bias=self.use_bias,
            mlp="plain",
            activation=self.hidden_act,
            mlp_bias=self.use_bias,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
        )

    def key_map(self) -> KeyMap:
        return KeyMap(renames=((r"(^|\.)mlp\.up_proj\.", r"\1mlp.c_fc."), (r"(^|\.)mlp\.down_proj\.", r"\1mlp.c_proj.")))


register(Starcoder2Config)
