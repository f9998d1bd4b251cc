"""The one contract every causal language model implements, and its outputs.

Everything that works on models (`generate`, `save_pretrained`, `from_pretrained`,
`shard`, the training helpers, the CLI) is written against [`AbstractCausalLM`][] and
nothing else, so a model a user builds from `eqxlm.nn` parts works with all of them once
it implements these few members (see the README's porting guide and
`tests/test_user_model.py`). It follows equinox's abstract/final pattern: abstract
attributes and methods here, concrete classes final.
"""

import abc
import dataclasses
from typing import Any, ClassVar

import equinox as eqx
import jax
from jaxtyping import Array, Bool, Float, Int

from .._typing import typecheck


class ModelOutput(eqx.Module):
    """A base model's output. `hidden_states` (embeddings, each layer's output but the
    last, and the final normed state, as transformers returns them) and `attentions` are
    None unless requested; `cache` is None unless one was passed in."""

    last_hidden_state: Float[Array, "seq hidden"]
    hidden_states: tuple[Float[Array, "seq hidden"], ...] | None = None
    attentions: tuple[Float[Array, "heads seq kv_seq"], ...] | None = None
    cache: Any = None


class CausalLMOutput(eqx.Module):
    """A causal language model's output: `logits` plus the base model's extras."""

    logits: Float[Array, "seq vocab"]
    hidden_states: tuple[Float[Array, "seq hidden"], ...] | None = None
    attentions: tuple[Float[Array, "heads seq kv_seq"], ...] | None = None
    cache: Any = None


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """The defaults `eqxlm.generate` reads: `generation_config.json`'s special ids."""

    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def to_hf(self) -> dict:
        eos = self.eos_token_id
        eos = None if eos is None else (eos[0] if len(eos) == 1 else list(eos))
        out = {"bos_token_id": self.bos_token_id, "eos_token_id": eos, "pad_token_id": self.pad_token_id}
        return {k: v for k, v in out.items() if v is not None}


class AbstractCausalLM(eqx.Module):
    """A causal language model, as every eqxlm tool sees it.

    **Abstract attributes:** `config` (a frozen config with `model_type` and `to_hf()`),
    `generation_config` (a [`GenerationConfig`][] or None).

    **Abstract methods:** `base_model` (property: a callable
    `(input_ids, attention_mask, positions, cache, *, output_hidden_states, output_attentions)
    -> ModelOutput`), `logits(hidden)`, `init_cache(max_length, *, dtype)`.

    **Family knowledge, with defaults:** `key_map()` (how parameter names map onto checkpoint
    keys: identity by default), `partition_rules()` (sharding rules over parameter names),
    `remat_types` (the layer classes that gradient checkpointing wraps).

    **Provided:** `__call__`, which runs the base model and the head.
    """

    config: eqx.AbstractVar[Any]
    generation_config: eqx.AbstractVar[GenerationConfig | None]
    remat_types: ClassVar[tuple[type, ...]] = ()

    @property
    @abc.abstractmethod
    def base_model(self) -> Any:
        """The model without its head: returns final hidden states in a [`ModelOutput`][]."""

    @abc.abstractmethod
    def logits(self, hidden: Float[Array, "seq hidden"]) -> Float[Array, "seq vocab"]:
        """The head alone: vocabulary logits for final hidden states."""

    @abc.abstractmethod
    def init_cache(self, max_length: int, *, dtype=None) -> Any:
        """An empty cache for one sequence of up to `max_length` tokens (padding included)."""

    def key_map(self):
        """The checkpoint key map (`eqxlm.params.KeyMap`): identity unless overridden."""
        from ..params import KeyMap

        return KeyMap()

    def partition_rules(self) -> tuple[tuple[str, tuple], ...]:
        """Sharding rules over parameter names (`eqxlm.params.DEFAULT_RULES` by default)."""
        from ..params import DEFAULT_RULES

        return DEFAULT_RULES

    def __repr__(self) -> str:
        # equinox's tree (arrays as dtype[shape]), headed by the architecture a person knows the
        # model by (`MistralForCausalLM: DecoderLM(...)`); treescope and `eqx.tree_pformat` are unchanged.
        tree = eqx.tree_pformat(self, short_arrays=True)
        name = architecture_name(self)
        return tree if name == type(self).__name__ else f"{name}: {tree}"

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        positions=None,
        cache: Any = None,
        *,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> CausalLMOutput:
        """**Arguments:** `input_ids` (one sequence, `Int[Array, "seq"]`; a numpy array or a
        list of ints is converted once; `jax.vmap` for a batch); `attention_mask` (1 = real
        token); `positions` (default: real tokens counted, continuing from `cache`); `cache`
        (from `init_cache`); `output_hidden_states`, `output_attentions`.
        **Returns:** a [`CausalLMOutput`][] with `logits` (`seq vocab`)."""
        from .._inputs import as_mask, as_token_ids

        input_ids = as_token_ids(input_ids, ndim=1)
        if attention_mask is not None:
            attention_mask = as_mask(attention_mask, tuple(input_ids.shape))
        return self._forward(
            input_ids,
            attention_mask,
            positions,
            cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )

    @typecheck
    def _forward(
        self,
        input_ids: Int[Array, " seq"],
        attention_mask: Bool[Array, " seq"] | None,
        positions: Int[Array, " seq"] | None,
        cache: Any,
        *,
        output_hidden_states: bool,
        output_attentions: bool,
    ) -> CausalLMOutput:
        out = self.base_model(
            input_ids,
            attention_mask,
            positions,
            cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        return CausalLMOutput(
            logits=self.logits(out.last_hidden_state),
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            cache=out.cache,
        )


def architecture_name(model) -> str:
    """The name to show a person for `model`: its config's Hugging Face architecture
    (`MistralForCausalLM`), else its class name (a user's own model)."""
    name = getattr(getattr(model, "config", None), "architecture", None)
    return name if isinstance(name, str) and name else type(model).__name__


def broadcast_cache(cache, batch: int):
    """A one-sequence cache repeated for `batch` sequences (for `jax.vmap`)."""
    import jax.numpy as jnp

    return jax.tree.map(lambda x: jnp.broadcast_to(x, (batch, *x.shape)), cache)
