"""What every decoder-only model shares: outputs, positions, the layer loop, the head,
initialisation and cache allocation. Model files compose these with the parts."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .._typing import typecheck
from ..nn import KVCache

Cache = tuple[KVCache, ...]


class ModelOutput(eqx.Module):
    """A base model's output. `hidden_states` (embeddings, each layer's output but the
    last, and the final normed state, as transformers returns them) and `attentions` are
    None unless requested; `cache` is None unless one was passed in."""

    last_hidden_state: Float[Array, "seq hidden"]
    hidden_states: tuple[Float[Array, "seq hidden"], ...] | None = None
    attentions: tuple[Float[Array, "heads seq kv_seq"], ...] | None = None
    cache: Cache | None = None


class CausalLMOutput(eqx.Module):
    """A causal language model's output: `logits` plus the base model's extras."""

    logits: Float[Array, "seq vocab"]
    hidden_states: tuple[Float[Array, "seq hidden"], ...] | None = None
    attentions: tuple[Float[Array, "heads seq kv_seq"], ...] | None = None
    cache: Cache | None = None


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


@typecheck
def resolve_positions(
    input_ids: Int[Array, " seq"],
    attention_mask: Int[Array, " seq"] | Bool[Array, " seq"] | None,
    positions: Int[Array, " seq"] | None,
    cache: Cache | None,
) -> tuple[Bool[Array, " seq"], Int[Array, " seq"]]:
    """`valid` (False at padding) and position ids. Without explicit `positions`,
    positions count real tokens only (`cumsum(mask) - 1`, continuing from the cache), so
    a left-padded row gives the same numbers as the unpadded one."""
    if attention_mask is None:
        valid = jnp.ones(input_ids.shape, bool)
    else:
        valid = attention_mask.astype(bool)
    if positions is None:
        start = jnp.zeros((), jnp.int32) if cache is None else cache[0].next_position
        counted = start + jnp.cumsum(valid, dtype=jnp.int32) - 1
        positions = jnp.where(valid, counted, 0)
    return valid, positions


@typecheck
def embed(embedding: eqx.nn.Embedding, input_ids: Int[Array, " seq"]) -> Float[Array, "seq hidden"]:
    """Look up token embeddings; an id outside the vocabulary is an error (never clamped)."""
    vocab = embedding.weight.shape[0]
    input_ids = eqx.error_if(input_ids, jnp.any((input_ids < 0) | (input_ids >= vocab)), f"token id out of range [0, {vocab})")
    return embedding.weight[input_ids]


def run_layers(
    layers,
    x: Float[Array, "seq hidden"],
    positions: Int[Array, " seq"],
    valid: Bool[Array, " seq"],
    cache: Cache | None,
    final_norm,
    output_hidden_states: bool,
    output_attentions: bool,
) -> ModelOutput:
    """Run the decoder layers, threading each layer's cache, then the final norm."""
    if cache is not None and len(cache) != len(layers):
        raise ValueError(f"cache has {len(cache)} layers, the model {len(layers)}.")
    hidden, attentions, new_cache = [x], [], []
    for i, layer in enumerate(layers):
        x, weights, layer_cache = layer(x, positions, valid, None if cache is None else cache[i])
        new_cache.append(layer_cache)
        attentions.append(weights)
        if i < len(layers) - 1:
            hidden.append(x)
    x = jax.vmap(final_norm)(x)
    hidden.append(x)
    return ModelOutput(
        last_hidden_state=x,
        hidden_states=tuple(hidden) if output_hidden_states else None,
        attentions=tuple(attentions) if output_attentions else None,
        cache=None if cache is None else tuple(new_cache),
    )


@typecheck
def lm_logits(
    lm_head: eqx.nn.Linear | None, embedding: eqx.nn.Embedding, hidden: Float[Array, "seq hidden"]
) -> Float[Array, "seq vocab"]:
    """Project to the vocabulary: `lm_head`, or the tied input embedding when it is None."""
    if lm_head is None:
        return jax.vmap(lambda h: embedding.weight @ h)(hidden)
    return jax.vmap(lm_head)(hidden)


def causal_lm_output(base_out: ModelOutput, logits) -> CausalLMOutput:
    return CausalLMOutput(
        logits=logits, hidden_states=base_out.hidden_states, attentions=base_out.attentions, cache=base_out.cache
    )


def init_cache(layers, attention_of, max_length: int, dtype) -> Cache:
    """One `KVCache` per layer: linear of `max_length` entries, or a rolling buffer of
    `sliding_window` entries when the layer's window is shorter than that."""
    caches = []
    for layer in layers:
        attn = attention_of(layer)
        window = attn.sliding_window
        rolling = window is not None and window < max_length
        size = window if rolling else max_length
        caches.append(KVCache.init(size, attn.num_kv_heads, attn.head_dim, dtype=dtype, rolling=rolling))
    return tuple(caches)


def init_weights(module, std: float, key: PRNGKeyArray):
    """Hugging Face's initialisation: every `Linear` and `Embedding` weight from
    `N(0, std)` (HF `initializer_range`), biases zero; norms keep their ones/zeros."""
    is_param = lambda x: isinstance(x, (eqx.nn.Linear, eqx.nn.Embedding))  # noqa: E731
    nodes = lambda m: [x for x in jax.tree.leaves(m, is_leaf=is_param) if is_param(x)]  # noqa: E731
    found = nodes(module)
    keys = jax.random.split(key, len(found))
    weights = [
        (std * jax.random.normal(k, n.weight.shape, jnp.float32)).astype(n.weight.dtype) for k, n in zip(keys, found, strict=True)
    ]
    module = eqx.tree_at(lambda m: [n.weight for n in nodes(m)], module, weights)
    biased = lambda m: [n.bias for n in nodes(m) if isinstance(n, eqx.nn.Linear) and n.bias is not None]  # noqa: E731
    return eqx.tree_at(biased, module, [jnp.zeros_like(b) for b in biased(module)])
