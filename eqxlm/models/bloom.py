"""BLOOM: embeddings -> LayerNorm -> N x (LayerNorm, ALiBi attention, LayerNorm, 4h GELU MLP) -> LayerNorm -> tied head."""

import dataclasses
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .._memory import check_constructor
from .._typing import typecheck
from ..nn import BloomAttention, BloomBlock, BloomMLP, LayerNorm
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
from ._config import BaseConfig, ConfigError


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
    hf_fields: ClassVar[dict[str, str]] = {
        name: name
        for name in (
            "vocab_size",
            "hidden_size",
            "n_layer",
            "n_head",
            "layer_norm_epsilon",
            "apply_residual_connection_post_layernorm",
            "tie_word_embeddings",
            "initializer_range",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "pretraining_tp",
            "slow_but_exact",
        )
    }
    ignored_fields: ClassVar[frozenset[str]] = frozenset(
        {
            "attention_softmax_in_fp32",
            "bias_dropout_fusion",
            "masked_softmax_fusion",
            "offset_alibi",
            "skip_bias_add",
            "skip_bias_add_qkv",
            "seq_length",
            "n_inner",
            "unk_token_id",
        }
    )

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


class BloomModel(eqx.Module):
    """The BLOOM decoder without a head: returns final hidden states (`BloomModel`)."""

    word_embeddings: eqx.nn.Embedding
    word_embeddings_layernorm: LayerNorm
    h: tuple[BloomBlock, ...]
    ln_f: LayerNorm
    config: BloomConfig = eqx.field(static=True)

    def __init__(self, config: BloomConfig, *, key: PRNGKeyArray, dtype=jnp.float32):
        """Layers from `config` (`BloomForCausalLM` re-initialises as transformers does)."""
        k_embed, *k_layers = jax.random.split(key, config.n_layer + 1)
        d, eps = config.hidden_size, config.layer_norm_epsilon
        self.word_embeddings = eqx.nn.Embedding(config.vocab_size, d, dtype=dtype, key=k_embed)
        self.word_embeddings_layernorm = LayerNorm(d, eps, dtype=dtype)
        self.h = tuple(
            BloomBlock(
                input_layernorm=LayerNorm(d, eps, dtype=dtype),
                self_attention=BloomAttention(d, config.n_head, dtype=dtype, key=jax.random.fold_in(k, 0)),
                post_attention_layernorm=LayerNorm(d, eps, dtype=dtype),
                mlp=BloomMLP(d, dtype=dtype, key=jax.random.fold_in(k, 1)),
                apply_residual_connection_post_layernorm=config.apply_residual_connection_post_layernorm,
            )
            for k in k_layers
        )
        self.ln_f = LayerNorm(d, eps, dtype=dtype)
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
        """As [`LlamaModel.__call__`][]; `positions` are ALiBi's key positions."""
        valid, positions = resolve_positions(input_ids, attention_mask, positions, cache)
        x = jax.vmap(self.word_embeddings_layernorm)(embed(self.word_embeddings, input_ids))
        return run_layers(self.h, x, positions, valid, cache, self.ln_f, output_hidden_states, output_attentions)

    def init_cache(self, max_length: int, *, dtype=None) -> Cache:
        """An empty per-layer cache for sequences up to `max_length` tokens."""
        dtype = self.word_embeddings.weight.dtype if dtype is None else dtype
        return init_cache(self.h, lambda block: block.self_attention, max_length, dtype)


class BloomForCausalLM(eqx.Module):
    """BLOOM with its language-model head (`BloomForCausalLM`), tied to the input
    embedding unless the config says `tie_word_embeddings: false`."""

    transformer: BloomModel
    lm_head: eqx.nn.Linear | None
    config: BloomConfig = eqx.field(static=True)
    generation_config: GenerationConfig | None = eqx.field(static=True, default=None)

    def __init__(
        self,
        config: BloomConfig,
        *,
        key: PRNGKeyArray,
        dtype=jnp.float32,
        generation_config: GenerationConfig | None = None,
    ):
        """Random initialisation from `config`, as transformers initialises."""
        check_constructor(type(self), config, key=key, dtype=dtype)  # fail at once if the weights cannot fit
        k_model, k_head, k_init = jax.random.split(key, 3)
        transformer = BloomModel(config, key=k_model, dtype=dtype)
        lm_head = None if config.tie_word_embeddings else make_linear(config.hidden_size, config.vocab_size, False, dtype, k_head)
        self.transformer, self.lm_head = init_weights((transformer, lm_head), config.initializer_range, k_init)
        self.config = config
        self.generation_config = generation_config

    @property
    def base_model(self) -> BloomModel:
        return self.transformer

    @typecheck
    def logits(self, hidden: Float[Array, "seq hidden"]) -> Float[Array, "seq vocab"]:
        """The head alone: vocabulary logits for final hidden states."""
        return lm_logits(self.lm_head, self.transformer.word_embeddings, hidden)

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
        """As [`BloomModel.__call__`][], returning `logits` in a [`CausalLMOutput`][]."""
        out = self.transformer(
            input_ids,
            attention_mask,
            positions,
            cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        return causal_lm_output(out, self.logits(out.last_hidden_state))

    def init_cache(self, max_length: int, *, dtype=None) -> Cache:
        """See [`BloomModel.init_cache`][]."""
        return self.transformer.init_cache(max_length, dtype=dtype)
