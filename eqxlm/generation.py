"""Batched, KV-cached generation: greedy and sampled, one compiled loop.

`generate` left-pads the prompts to a length bucket, prefills a preallocated cache for
the whole batch in one call, then runs every decode step inside one `lax.while_loop`
(static shapes, so it compiles once per bucket). How each next token is chosen is one
[`SamplingConfig`][] (transformers' `GenerationConfig` names), shared with `eqxlm chat` and
the CLI; its processors run in the order transformers' `generate` builds them: the
repetition penalty (greedy too), then, when sampling, temperature, top-k, top-p, min-p, then
a categorical draw.

**What triggers a compile** (and what does not): a new batch size, prompt-length bucket
(`bucket_length`: powers of two from 16), `max_new_tokens` bucket (the same buckets),
number of EOS ids, `do_sample`, `streamer`, `mesh`, or model structure/dtype. A new prompt of the
same bucket, a new `temperature`, `top_k`, `top_p`, `min_p`, `repetition_penalty` (each on or
off), `key` or `max_new_tokens` inside its bucket reuses the compiled loop: an unset
processor runs with its identity value (top-k 0, top-p 1, min-p 0, penalty 1).
"""

import dataclasses
import math
import numbers
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._inputs import as_mask, as_token_ids, check_length
from ._typing import typecheck
from .models import AbstractCausalLM, broadcast_cache
from .nn import _taps

MIN_BUCKET = 16


def bucket_length(n: int) -> int:
    """The padded length used for `n`: the next power of two, at least 16."""
    return max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# field -> (what is valid, the test): checked once, when a SamplingConfig is made
_VALID = {
    "do_sample": ("True or False", lambda v: isinstance(v, bool | np.bool_)),
    "temperature": ("a number > 0 (greedy is do_sample=False)", lambda v: _real(v) and 0 < v < math.inf),
    "top_k": ("an int >= 1, or None (off)", lambda v: v is None or (isinstance(v, numbers.Integral) and _real(v) and v >= 1)),
    "top_p": ("in (0, 1], or None (off)", lambda v: v is None or (_real(v) and 0 < v <= 1)),
    "min_p": ("in [0, 1], or None (off)", lambda v: v is None or (_real(v) and 0 <= v <= 1)),
    "repetition_penalty": ("a number > 0 (1.0 = off)", lambda v: _real(v) and 0 < v < math.inf),
}


class SamplingConfigError(ValueError):
    """A [`SamplingConfig`][] field out of its range; `field`, `value` and `valid` say which,
    what it was and what it may be (the CLI rewrites them with its option names)."""

    def __init__(self, field: str, value, valid: str):
        self.field, self.value, self.valid = field, value, valid
        super().__init__(f"SamplingConfig: {field} must be {valid}, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How each next token is chosen, by `generate`, `eqxlm chat` and the CLI; the fields are
    transformers' `GenerationConfig` fields of the same names, and do the same.

    - `do_sample`: `False` (the default: `SamplingConfig()` is greedy) takes the argmax;
      `True` draws from the distribution the warpers below leave (`generate` then needs a `key`).
    - `repetition_penalty` (`1.0` = off): every token id already in the sequence (the
      prompt's real tokens and the tokens generated so far) has its logit divided by the
      penalty when positive and multiplied by it when negative; greedy too. Padding
      (attention mask 0) never counts: transformers' `generate` skips each row's leading
      padding, and eqxlm skips a masked token anywhere in the row.
    - Sampling only, in this order: `temperature` (> 0) divides the logits; `top_k`
      (`None` = off) keeps the logits `>=` the k-th largest (ties kept); `top_p` (`None` =
      off) keeps the most likely tokens until their probability reaches `top_p` (the most
      likely always kept); `min_p` (`None` = off) keeps the tokens whose probability is at
      least `min_p` times the most likely one's (after temperature, top-k and top-p).

    Every field is checked when the config is made: a bad one raises
    [`SamplingConfigError`][] (a `ValueError`) naming it, its value and its valid range.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        for field, (valid, ok) in _VALID.items():
            value = getattr(self, field)
            if not ok(value):
                raise SamplingConfigError(field, value, valid)

    def values(self) -> "SamplingValues":
        """This config as the compiled loop takes it (see [`SamplingValues`][])."""
        return SamplingValues(
            temperature=np.asarray(self.temperature, np.float32),
            top_k=np.asarray(self.top_k or 0, np.int32),
            top_p=np.asarray(1.0 if self.top_p is None else self.top_p, np.float32),
            min_p=np.asarray(self.min_p or 0.0, np.float32),
            repetition_penalty=np.asarray(self.repetition_penalty, np.float32),
            do_sample=self.do_sample,
        )


class SamplingValues(eqx.Module):
    """A [`SamplingConfig`][] as it crosses `jit`: the numbers are array leaves (traced, so a
    new value compiles nothing; an unset processor takes its identity value: `top_k` 0,
    `top_p` 1, `min_p` 0), `do_sample` is static (it changes the code)."""

    temperature: Float[Array, ""] | Float[np.ndarray, ""]
    top_k: Int[Array, ""] | Int[np.ndarray, ""]
    top_p: Float[Array, ""] | Float[np.ndarray, ""]
    min_p: Float[Array, ""] | Float[np.ndarray, ""]
    repetition_penalty: Float[Array, ""] | Float[np.ndarray, ""]
    do_sample: bool = eqx.field(static=True, default=False)


@typecheck
def present(ids: Int[Array, " seq"], mask: Bool[Array, " seq"], vocab: int) -> Bool[Array, " vocab"]:
    """Which token ids occur among the real (`mask`) entries of `ids`: what the repetition
    penalty counts. Ids outside the vocabulary are ignored, as transformers does."""
    return jnp.zeros(vocab, bool).at[jnp.where(mask, ids, vocab)].set(True, mode="drop")


def _repetition_penalty(logits, seen, penalty):
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def _top_k(logits, top_k):
    vocab = logits.shape[0]
    ascending = jnp.sort(logits)
    kth = jnp.where(top_k > 0, ascending[jnp.clip(vocab - top_k, 0, vocab - 1)], -jnp.inf)
    return jnp.where(logits < kth, -jnp.inf, logits)


def _top_p(logits, top_p):
    order = jnp.argsort(logits)
    cumulative = jnp.cumsum(jax.nn.softmax(logits[order]))
    # top_p == 1 is off (transformers adds no warper): even a token whose probability rounds to 0 stays
    remove_sorted = ((cumulative <= 1.0 - jnp.asarray(top_p, jnp.float32)) & (top_p < 1.0)).at[-1].set(False)
    remove = jnp.zeros(logits.shape[0], bool).at[order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, logits)


def _min_p(logits, min_p):
    probs = jax.nn.softmax(logits)
    return jnp.where(probs < min_p * jnp.max(probs), -jnp.inf, logits)


@typecheck
def process_logits(
    logits: Float[Array, " vocab"], sampling: SamplingValues, seen: Bool[Array, " vocab"] | None = None
) -> Float[Array, " vocab"]:
    """transformers' logits processors for one row of logits (in float32), in the order its
    `generate` applies them for the same `GenerationConfig`:

    - with `seen` (the ids in the sequence so far, see [`present`][]): the repetition penalty,
      greedy or not;
    - when `sampling.do_sample`: temperature, top-k, top-p, min-p.

    Removed entries become `-inf`. `sampling` is `SamplingConfig(...).values()`, traced or not.
    """
    logits = logits.astype(jnp.float32)
    if seen is not None:
        logits = _repetition_penalty(logits, seen, sampling.repetition_penalty)
    if not sampling.do_sample:
        return logits
    logits = logits / sampling.temperature
    logits = _top_k(logits, sampling.top_k)
    logits = _top_p(logits, sampling.top_p)
    return _min_p(logits, sampling.min_p)


@typecheck
def select_tokens(
    logits: Float[Array, "batch vocab"], seen: Bool[Array, "batch vocab"], key: PRNGKeyArray, sampling: SamplingValues
) -> Int[Array, " batch"]:
    """The next token of every row: the argmax of its processed logits (see
    [`process_logits`][]; `seen` is each row's ids so far), or, when sampling, a draw from them."""
    processed = jax.vmap(process_logits, in_axes=(0, None, 0))(logits, sampling, seen)
    if not sampling.do_sample:
        return jnp.argmax(processed, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, processed, axis=-1).astype(jnp.int32)


@eqx.filter_jit
def _generate(
    model,
    input_ids,
    attention_mask,
    key,
    sampling: SamplingValues,
    eos,
    pad,
    max_new_tokens,
    *,
    buffer: int,
    streamer: Callable | None,
    mesh,
    capture: bool = False,
):
    batch, prompt = input_ids.shape
    base = model.base_model
    cache = broadcast_cache(model.init_cache(prompt + buffer), batch)
    if mesh is not None:  # batch over the data axes, kv heads over tensor
        from .sharding import cache_shardings

        cache = jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))

    def emit(tokens):
        if streamer is not None:
            io_callback(lambda t: streamer(np.asarray(t)), None, tokens, ordered=True)

    def step_logits(ids, mask, cache, keys=None):
        """Next-token logits and the new cache; with `capture`, also the values `eqxlm.inspect`
        hooks recorded (collected inside the vmap and returned as outputs; their keys go to `keys`)."""

        def one(i, m, c):
            if not capture:
                out = base(i, m, cache=c)
                return model.logits(out.last_hidden_state[-1:])[0], out.cache, ()
            with _taps.collecting() as got:
                out = base(i, m, cache=c)
                logits = model.logits(out.last_hidden_state[-1:])[0]
            keys[:] = list(got)
            return logits, out.cache, tuple(got[k] for k in keys)

        return jax.vmap(one)(ids, mask, cache)

    prefill_keys, step_keys = [], []
    logits, cache, prefilled = step_logits(input_ids, attention_mask, cache, prefill_keys)
    # the repetition penalty counts the prompts' real tokens (the mask), never their padding
    seen = jax.vmap(lambda i, m: present(i, m, logits.shape[-1]))(input_ids, attention_mask)
    rows = jnp.arange(batch)
    key, sub = jax.random.split(key)
    token = select_tokens(logits, seen, sub, sampling)
    seen = seen.at[rows, token].set(True)
    done = jnp.isin(token, eos)
    tokens = jnp.full((batch, buffer), pad, jnp.int32).at[:, 0].set(token)
    emit(token)
    ones = jnp.ones((batch, 1), bool)
    # with `capture`: one buffer per captured value, `(batch, buffer, ...)`, step `i` at `i - 1`
    shapes = jax.eval_shape(lambda c: step_logits(token[:, None], ones, c, step_keys)[2], cache) if capture else ()
    captured = tuple(jnp.zeros((batch, buffer, *s.shape[1:]), s.dtype) for s in shapes)

    def cond(carry):
        i, _, _, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, tokens, cache, seen, token, done, key, captured = carry
        logits, cache, values = step_logits(token[:, None], ones, cache, step_keys)
        captured = tuple(jax.lax.dynamic_update_index_in_dim(b, v, i - 1, axis=1) for b, v in zip(captured, values, strict=True))
        key, sub = jax.random.split(key)
        token = jnp.where(done, pad, select_tokens(logits, seen, sub, sampling))
        seen = seen.at[rows, token].set(True)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
        emit(token)
        return i + 1, tokens, cache, seen, token, done | jnp.isin(token, eos), key, captured

    carry = (jnp.ones((), jnp.int32), tokens, cache, seen, token, done, key, captured)
    _, tokens, _, _, _, _, _, captured = jax.lax.while_loop(cond, body, carry)
    if not capture:
        return tokens
    return tokens, (tuple(prefill_keys), prefilled, tuple(step_keys), captured)


def _record_generate_captures(captures, prompt_pad: int, steps: int) -> None:
    """Re-record what `_generate(capture=True)` returned into the collector `eqxlm.inspect.run`
    opened: the prefill's values under their names (the batch first, the bucket's left padding
    removed from the query axis; attention probabilities keep every cache entry as keys), the
    decode steps' under `name@decode` (batch, then step, then the one-token value)."""
    prefill_keys, prefilled, step_keys, decoded = captures
    for keys, values, suffix, lead in ((prefill_keys, prefilled, "", 1), (step_keys, decoded, "@decode", 2)):
        for key, value in zip(keys, values, strict=True):
            for name, row in key:
                v = value if row < 0 else value[(slice(None),) * lead + (row,)]  # a scanned layer's row
                v = v[:, :steps] if suffix else v
                if not suffix and v.ndim >= 2:  # (batch, seq, ...): drop the bucket's left padding
                    v = v[:, :, prompt_pad:] if name.endswith(".probs") else v[:, prompt_pad:]
                _taps.record(((name + suffix, -1),), v)


def check_request(model, mask, max_new_tokens, sampling: SamplingConfig, key=0) -> None:
    """`generate`'s checks of a request, before anything compiles (the CLI runs them before
    printing anything): `mask` is the `batch x seq` attention mask (bool numpy)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    rows_without_last = np.flatnonzero(~mask[:, -1])
    if rows_without_last.size:
        row = int(rows_without_last[0])
        what = "has no real token" if not mask[row].any() else "ends with padding (right-padded)"
        raise ValueError(
            f"attention_mask: row {row} {what}. generate continues each row from its last position, so pad "
            "on the left (tokenizers: padding_side='left'); an empty prompt needs at least a BOS token."
        )
    longest = int(mask.sum(axis=1).max())
    check_length(model.config, longest + max_new_tokens, f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens})")
    if sampling.do_sample and key is None:
        raise ValueError("sampling needs a key: generate(..., sampling=SamplingConfig(do_sample=True), key=jax.random.key(0)).")


@typecheck
def generate(
    model: AbstractCausalLM,
    input_ids: Int[Array, "batch seq"] | Int[np.ndarray, "batch seq"] | list,
    attention_mask: Int[Array, "batch seq"]
    | Bool[Array, "batch seq"]
    | Int[np.ndarray, "batch seq"]
    | Bool[np.ndarray, "batch seq"]
    | list
    | None = None,
    *,
    max_new_tokens: int = 64,
    sampling: SamplingConfig | None = None,
    eos_token_id: int | list[int] | tuple[int, ...] | None = None,
    pad_token_id: int | None = None,
    key: PRNGKeyArray | None = None,
    streamer: Callable[[np.ndarray], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Int[Array, "batch total"]:
    """Generate continuations of a batch of prompts, as transformers' `generate`.

    **Arguments:**
    - `model`: any causal LM implementing `eqxlm.models.AbstractCausalLM` (`from_pretrained`,
      `eqxlm.DecoderLM(config, key=...)`, or a model of your own).
    - `input_ids`: prompts, `batch x seq` (one prompt: `ids[None]`), ragged ones
      **left**-padded; a jax or numpy array, or lists of ints. `attention_mask` 1 = real
      token (default: all real); every row must end with a real token (right padding is
      refused: each row continues from its last position).
    - `max_new_tokens`: tokens to add to every row.
    - `sampling`: a [`SamplingConfig`][] (default `SamplingConfig()`: greedy, no penalty):
      greedy or sampled, with temperature, top-k, top-p, min-p and a repetition penalty. A
      sampled config draws with `key` (required; the same key gives the same tokens).
    - `eos_token_id`: one id or several; default the checkpoint's generation config
      (`[]` disables stopping). A row that emits one is finished and holds
      `pad_token_id` (default: the config's pad id, else the first EOS id, else 0)
      afterwards; the loop ends early once every row is finished.
    - `streamer`: called with each step's new tokens (a numpy `(batch,)` array) as they
      are produced.
    - `mesh`: for a model placed with `eqxlm.shard`: prompts are split over the mesh's
      batch axes and the KV cache is sharded batch over data, heads over tensor.

    **Returns:** `batch x (seq + max_new_tokens)`: the prompts as given, then the new tokens.

    Raises `ValueError` before compiling anything when the request cannot fit the model
    (longest prompt's real tokens + `max_new_tokens` > `max_position_embeddings`), a row is
    right-padded, or a setting is invalid; for a model without a position limit (BLOOM),
    warns once when the request runs past the length it was trained on (when its config
    says). Ids that are not integers or not `batch x seq` raise a short `TypeError`.
    """
    # Host-side bookkeeping: nothing here compiles.
    input_ids = np.asarray(as_token_ids(input_ids, "input_ids", ndim=2))
    batch, seq = input_ids.shape
    if seq == 0:
        raise ValueError("input_ids: every prompt needs at least one token (a BOS token for an empty prompt).")
    mask = np.ones((batch, seq), bool) if attention_mask is None else np.asarray(as_mask(attention_mask, (batch, seq)))
    sampling = SamplingConfig() if sampling is None else sampling
    check_request(model, mask, max_new_tokens, sampling, key)
    key = jax.random.key(0) if key is None else key
    generation = model.generation_config
    if eos_token_id is None:
        eos_token_id = (generation.eos_token_id if generation else None) or model.config.eos_token_id or ()
    eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    if pad_token_id is None:
        pad_token_id = (generation.pad_token_id if generation else None) or model.config.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0

    prompt = bucket_length(seq)
    padded_ids = np.pad(input_ids, ((0, 0), (prompt - seq, 0)), constant_values=pad_token_id)
    padded_mask = np.pad(mask, ((0, 0), (prompt - seq, 0)))
    if mesh is not None:
        from .sharding import shard_batch

        padded_ids, padded_mask = shard_batch(padded_ids, mesh), shard_batch(padded_mask, mesh)
    capture = _taps.active()  # inside `eqxlm.inspect.run`: captures come back per step
    new = _generate(
        model,
        padded_ids,
        padded_mask,
        key,
        sampling.values(),
        np.asarray(eos if eos else (-1,), np.int32),
        np.int32(pad_token_id),
        np.int32(max_new_tokens),
        buffer=bucket_length(max_new_tokens),
        streamer=streamer,
        mesh=mesh,
        capture=capture,
    )
    if capture:
        new, captures = new
        _record_generate_captures(captures, prompt - seq, max_new_tokens - 1)
    return jax.device_put(np.concatenate([input_ids, np.asarray(new)[:, :max_new_tokens]], axis=1))
