"""Llama: embeddings -> N x (RMSNorm, rotary GQA attention, RMSNorm, SwiGLU) -> RMSNorm -> head.

Mistral (`mistral.py`) is the same recipe; only its config differs (a sliding window,
no projection biases), so it reuses these classes rather than copying them.
"""

import dataclasses
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .._memory import check_constructor
from .._typing import typecheck
from ..nn import Attention, DecoderLayer, GatedMLP, RMSNorm, RotaryEmbedding
from ..nn._linear import make_linear
from ._common import (
    Cache,
    CausalLMOutput,
    GenerationConfig,
    ModelOutput,
    causal_lm_output,
    embed,
    init_cache,
    init_weights,
    lm_logits,
    resolve_positions,
    run_layers,
)
from ._config import BaseConfig, ConfigError, RopeScaling, rope_from_hf, rope_to_hf

ACTIVATIONS = {"silu": jax.nn.silu}

_LLAMA_FAMILY_FIELDS = {
    name: name
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "tie_word_embeddings",
        "initializer_range",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    )
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(BaseConfig):
    """Llama's configuration, with `transformers.LlamaConfig`'s field names and defaults.

    `rope_theta` / `rope_scaling` are read from either transformers 4's fields or
    transformers 5's `rope_parameters`, and written back as `rope_parameters`.
    `head_dim` None means `hidden_size // num_attention_heads`; `num_key_value_heads`
    None means `num_attention_heads`. Ignored (as transformers 5 ignores it):
    `pretraining_tp`.
    """

    model_type: ClassVar[str] = "llama"
    architecture: ClassVar[str] = "LlamaForCausalLM"
    hf_fields: ClassVar[dict[str, str]] = {
        **_LLAMA_FAMILY_FIELDS,
        "attention_bias": "attention_bias",
        "mlp_bias": "mlp_bias",
    }
    ignored_fields: ClassVar[frozenset[str]] = frozenset({"pretraining_tp"})

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act: {self.hidden_act!r} is not supported (supported: {', '.join(ACTIVATIONS)}).")
        if self.num_attention_heads % self.kv_heads:
            raise ConfigError(
                f"num_key_value_heads ({self.kv_heads}) must divide num_attention_heads ({self.num_attention_heads})."
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be >= 1 or null, got {self.sliding_window}.")

    @property
    def kv_heads(self) -> int:
        return self.num_attention_heads if self.num_key_value_heads is None else self.num_key_value_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def _normalise(cls, raw: dict[str, Any]) -> dict[str, Any]:
        return rope_from_hf(raw)

    def to_hf(self) -> dict[str, Any]:
        out = super().to_hf()
        out["rope_parameters"] = rope_to_hf(out.pop("rope_theta"), out.pop("rope_scaling"))
        return out


def _decoder_layer(config: LlamaConfig, dtype, key: PRNGKeyArray) -> DecoderLayer:
    k_attn, k_mlp = jax.random.split(key)
    rotary = RotaryEmbedding(config.dim_per_head, config.rope_theta, config.rope_scaling)
    attn = Attention(
        config.hidden_size,
        config.num_attention_heads,
        config.kv_heads,
        config.dim_per_head,
        use_bias=config.attention_bias,
        rotary=rotary,
        sliding_window=config.sliding_window,
        dtype=dtype,
        key=k_attn,
    )
    mlp = GatedMLP(
        config.hidden_size,
        config.intermediate_size,
        use_bias=config.mlp_bias,
        activation=ACTIVATIONS[config.hidden_act],
        dtype=dtype,
        key=k_mlp,
    )
    norm = lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)  # noqa: E731
    return DecoderLayer(input_layernorm=norm(), self_attn=attn, post_attention_layernorm=norm(), mlp=mlp)


def _check_config(module, config) -> None:
    if not isinstance(config, module.config_class):
        raise TypeError(f"{type(module).__name__} needs a {module.config_class.__name__}, got {type(config).__name__}.")


class LlamaModel(eqx.Module):
    """The Llama decoder without a head: returns final hidden states (`LlamaModel`)."""

    embed_tokens: eqx.nn.Embedding
    layers: tuple[DecoderLayer, ...]
    norm: RMSNorm
    config: LlamaConfig = eqx.field(static=True)
    config_class: ClassVar[type] = LlamaConfig

    def __init__(self, config: LlamaConfig, *, key: PRNGKeyArray, dtype=jnp.float32):
        """Layers from `config` (weights as `eqx.nn` initialises them; the
        `ForCausalLM` class re-initialises as transformers does)."""
        _check_config(self, config)
        k_embed, *k_layers = jax.random.split(key, config.num_hidden_layers + 1)
        self.embed_tokens = eqx.nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype, key=k_embed)
        self.layers = tuple(_decoder_layer(config, dtype, k) for k in k_layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.config = config

    @typecheck
    def __call__(
        self,
        input_ids: Int[Array, " seq"],
        attention_mask: Int[Array, " seq"] | Bool[Array, " seq"] | None = None,
        positions: Int[Array, " seq"] | None = None,
        cache: Cache | None = None,
        *,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> ModelOutput:
        """**Arguments:** `input_ids` (one sequence); `attention_mask` (1 = real token);
        `positions` (default: real tokens counted, continuing from `cache`); `cache` (from
        `init_cache`); `output_hidden_states`, `output_attentions`.
        **Returns:** a [`ModelOutput`][]."""
        valid, positions = resolve_positions(input_ids, attention_mask, positions, cache)
        x = embed(self.embed_tokens, input_ids)
        return run_layers(self.layers, x, positions, valid, cache, self.norm, output_hidden_states, output_attentions)

    def init_cache(self, max_length: int, *, dtype=None) -> Cache:
        """An empty per-layer cache for sequences up to `max_length` tokens (padding
        included); sliding-window layers get a rolling buffer of the window's size."""
        dtype = self.embed_tokens.weight.dtype if dtype is None else dtype
        return init_cache(self.layers, lambda layer: layer.self_attn, max_length, dtype)


class LlamaForCausalLM(eqx.Module):
    """Llama with its language-model head (`LlamaForCausalLM`). With
    `tie_word_embeddings`, `lm_head` is None and the input embedding is reused."""

    model: LlamaModel
    lm_head: eqx.nn.Linear | None
    config: LlamaConfig = eqx.field(static=True)
    generation_config: GenerationConfig | None = eqx.field(static=True, default=None)
    config_class: ClassVar[type] = LlamaConfig
    base_model_class: ClassVar[type] = LlamaModel

    def __init__(
        self,
        config: LlamaConfig,
        *,
        key: PRNGKeyArray,
        dtype=jnp.float32,
        generation_config: GenerationConfig | None = None,
    ):
        """Random initialisation from `config`, as transformers initialises."""
        _check_config(self, config)
        check_constructor(type(self), config, key=key, dtype=dtype)  # fail at once if the weights cannot fit
        k_model, k_head, k_init = jax.random.split(key, 3)
        self.model = self.base_model_class(config, key=k_model, dtype=dtype)
        self.lm_head = (
            None if config.tie_word_embeddings else make_linear(config.hidden_size, config.vocab_size, False, dtype, k_head)
        )
        self.config = config
        self.generation_config = generation_config
        initialised = init_weights((self.model, self.lm_head), config.initializer_range, k_init)
        self.model, self.lm_head = initialised

    @property
    def base_model(self) -> LlamaModel:
        return self.model

    @typecheck
    def logits(self, hidden: Float[Array, "seq hidden"]) -> Float[Array, "seq vocab"]:
        """The head alone: vocabulary logits for final hidden states."""
        return lm_logits(self.lm_head, self.model.embed_tokens, hidden)

    @typecheck
    def __call__(
        self,
        input_ids: Int[Array, " seq"],
        attention_mask: Int[Array, " seq"] | Bool[Array, " seq"] | None = None,
        positions: Int[Array, " seq"] | None = None,
        cache: Cache | None = None,
        *,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> CausalLMOutput:
        """As [`LlamaModel.__call__`][], returning `logits` (`seq vocab`) in a
        [`CausalLMOutput`][]."""
        out = self.model(
            input_ids,
            attention_mask,
            positions,
            cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        return causal_lm_output(out, self.logits(out.last_hidden_state))

    def init_cache(self, max_length: int, *, dtype=None) -> Cache:
        """See [`LlamaModel.init_cache`][]."""
        return self.model.init_cache(max_length, dtype=dtype)
