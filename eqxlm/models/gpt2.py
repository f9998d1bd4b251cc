"""GPT-2: learned absolute positions, LayerNorm with bias, a fused `c_attn` projection
(`[Q; K; V]`), `gelu_new`, a plain MLP, and a tied head. Checkpoint weights are `Conv1D`s,
stored `(in, out)`: the key map transposes them on import and export.

Scale options: `scale_attn_weights` (divide scores by `sqrt(head_dim)`, default on) and
`scale_attn_by_inverse_layer_idx` (and by `layer + 1`) are honoured; `reorder_and_upcast_attn`
and `add_cross_attention` are refused by name.
"""

import dataclasses
from typing import ClassVar

from ..params import Fused, KeyMap
from ._builder import DecoderSpec, NormSpec
from ._config import BaseConfig, ConfigError
from ._registry import register


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config(BaseConfig):
    """GPT-2's configuration (`transformers.GPT2Config` names and defaults)."""

    model_type: ClassVar[str] = "gpt2"
    architecture: ClassVar[str] = "GPT2LMHeadModel"
    features: ClassVar[str] = (
        "learned positions, `Conv1D` weights transposed, fused `c_attn`, `gelu_new`, "
        "`scale_attn_weights`, `scale_attn_by_inverse_layer_idx`, tied head"
    )
    refused: ClassVar[str] = "`reorder_and_upcast_attn`, `add_cross_attention`"
    activation_field: ClassVar[str] = "activation_function"
    ignored_fields: ClassVar[dict[str, str]] = {
        **{name: "dropout: training only" for name in ("attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_first_dropout")},
        **{
            name: "the sequence-classification / double-heads summary, not the language model"
            for name in ("summary_activation", "summary_proj_to_labels", "summary_type", "summary_use_proj")
        },
        "n_ctx": "an alias of n_positions in old configs; transformers reads n_positions",
        "task_specific_params": "generation defaults of pipelines",
        "gradient_checkpointing": "a training switch of old transformers",
    }

    vocab_size: int = 50257
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    n_positions: int = 1024
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: tuple[int, ...] | None = (50256,)

    def __post_init__(self):
        super().__post_init__()
        if self.reorder_and_upcast_attn:
            raise ConfigError("reorder_and_upcast_attn: true (scores computed in float32 in another order) is not supported.")
        if self.add_cross_attention:
            raise ConfigError("add_cross_attention: true (an encoder-decoder GPT-2) is not supported.")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}).")

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    def decoder_spec(self) -> DecoderSpec:
        head_dim = self.n_embd // self.n_head
        scale = head_dim**-0.5 if self.scale_attn_weights else 1.0
        scales = tuple(scale / (i + 1) for i in range(self.n_layer)) if self.scale_attn_by_inverse_layer_idx else scale
        return DecoderSpec(
            vocab_size=self.vocab_size,
            hidden_size=self.n_embd,
            intermediate_size=self.n_inner or 4 * self.n_embd,
            num_layers=self.n_layer,
            num_heads=self.n_head,
            num_kv_heads=self.n_head,
            head_dim=head_dim,
            norm=NormSpec("layer", self.layer_norm_epsilon),
            layer_windows=(None,) * self.n_layer,
            learned_positions=self.n_positions,
            positions=None,
            rope=None,
            qkv_bias=True,
            o_bias=True,
            query_scale=scales,
            mlp="plain",
            activation=self.activation_function,
            mlp_bias=True,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
        )

    def key_map(self) -> KeyMap:
        return KeyMap(
            renames=(
                (r"^model\.embed_tokens\.", "transformer.wte."),
                (r"^model\.embed_positions\.", "transformer.wpe."),
                (r"^model\.norm\.", "transformer.ln_f."),
                (r"^model\.layers\.", "transformer.h."),
                (r"(^|\.)input_layernorm\.", r"\1ln_1."),
                (r"(^|\.)post_attention_layernorm\.", r"\1ln_2."),
                (r"(^|\.)self_attn\.o_proj\.", r"\1attn.c_proj."),
                (r"(^|\.)self_attn\.", r"\1attn."),
                (r"(^|\.)mlp\.up_proj\.", r"\1mlp.c_fc."),
                (r"(^|\.)mlp\.down_proj\.", r"\1mlp.c_proj."),
            ),
            fused=(Fused("c_attn", ("q_proj", "k_proj", "v_proj")),),
            transposed=r"\.(c_attn|c_proj|c_fc)\.weight$",
            ignored=r"(^|\.)attn\.(bias|masked_bias)$",
            aliases=((r"^(?!transformer\.|lm_head\.)", "transformer."),),
        )


register(GPT2Config)
