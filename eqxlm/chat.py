"""A conversation with a model that keeps its KV cache across turns.

`ChatSession` holds the messages, the token history and one KV cache. A turn renders the new
user message with the checkpoint's chat template and prefills **only the tokens that are not in
the cache yet** (the closing of the previous assistant turn and the new turn's opening), then
decodes one token at a time until an end-of-turn token (EOS, `<|eot_id|>`, `<|im_end|>`,
`<end_of_turn>`, ...) or `max_new_tokens`, streaming text as it comes.

Two compiled functions serve every turn, each compiled once per session: a prefill of a fixed
`chunk` of tokens and a one-token step. A turn's new tokens go through the chunk function
`n // chunk` times and through the step for the rest, so no padding ever enters the cache (a
padded entry would still take a slot of a sliding-window buffer) and nothing recompiles when
lengths change.

How the new tokens are found: the template is rendered with a marker in place of the last
reply, for the conversation up to that reply and for the conversation with the new user
message and the generation prompt; what follows the marker in the first is the turn's closing
(`<|im_end|>\\n`, `<end_of_turn>\\n`, ...) and the difference between the two is the new turn's
opening. The cache keeps the reply's tokens exactly as the model produced them (as llama.cpp
does), so the cache never has to be rewound. A template whose renderings are not prefixes of
each other (rare) makes the session re-prefill the whole conversation, counted in
`turn_stats`.

The terminal loop (`run`) is thin: it reads lines, prints the pieces `reply` streams, and ends on
Ctrl-D or Ctrl-C.
"""

import sys
from collections.abc import Callable
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .generation import SamplingConfig, present, select_tokens
from .tokenizer import ChatTemplateError, Tokenizer

_MARKER = "\x00eqxlm-reply\x00"


@eqx.filter_jit
def _feed(model, cache, seen, ids, key, sampling):
    """Run `ids` (a chunk, or one token) through the model on top of `cache`; return the next
    token chosen from the last position's logits (`seen`, the ids in the cache, feeds the
    repetition penalty), the updated cache and the updated `seen`."""
    real = jnp.ones(ids.shape, bool)
    out = model(ids, real, cache=cache)
    seen = seen | present(ids, real, seen.shape[0])
    return select_tokens(out.logits[-1:], seen[None], key, sampling)[0], out.cache, seen


@eqx.filter_jit
def _init_cache(model, max_length: int):
    return model.init_cache(max_length)


@dataclass
class TurnStats:
    prefilled: int  # tokens prefilled this turn (the new ones only, unless re-prefilled)
    prompt_end: int  # tokens in the cache once the prefill is done
    generated: list[int]  # the reply's tokens, the stop token included when there was one
    cache_end: int  # tokens in the cache after the turn
    reprefilled: bool  # the whole conversation was prefilled again (template not incremental)


class ChatSession:
    """A multi-turn conversation with `model`, reusing its KV cache.

    **Arguments:** `model` (an eqxlm causal LM); `tokenizer` (with a `chat_template`);
    `system` (an optional system prompt); `max_length` (tokens the conversation may hold;
    default and upper bound: the model's `max_position_embeddings`, else 4096);
    `max_new_tokens` per reply; `sampling` (an `eqxlm.SamplingConfig`; default greedy; the
    repetition penalty counts every token of the conversation so far), `seed`; `chunk`
    (prefill block size).
    """

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        *,
        system: str | None = None,
        max_length: int | None = None,
        max_new_tokens: int = 256,
        sampling: SamplingConfig | None = None,
        seed: int = 0,
        chunk: int = 16,
    ):
        if tokenizer.chat_template is None:
            raise ChatTemplateError(f"{tokenizer.name or 'this tokenizer'} has no chat template; `eqxlm chat` needs one.")
        limit = getattr(model.config, "max_position_embeddings", None) or 4096
        self.max_length = min(max_length or limit, limit)
        if max_new_tokens < 1 or max_new_tokens >= self.max_length:
            raise ValueError(f"max_new_tokens must be in [1, {self.max_length}), got {max_new_tokens}.")
        self.model, self.tokenizer = model, tokenizer
        self.system, self.max_new_tokens, self.chunk = system, max_new_tokens, chunk
        self.sampling = SamplingConfig() if sampling is None else sampling
        self._values = self.sampling.values()
        self._vocab = eqx.filter_eval_shape(lambda m: m(jnp.zeros((1,), jnp.int32)).logits, model).shape[-1]
        self._key = jax.random.key(seed)
        generation = model.generation_config
        eos = (generation.eos_token_id if generation else None) or model.config.eos_token_id or ()
        self.stop_ids = tokenizer.end_of_turn_ids([eos] if isinstance(eos, int) else eos)
        self.turn_stats: list[TurnStats] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.history: list[int] = []  # every token in the cache, in order
        self.cache = _init_cache(self.model, self.max_length)
        self._seen = jnp.zeros(self._vocab, bool)  # which ids `history` holds

    @property
    def cache_end(self) -> int:
        """Tokens held in the cache (its write index)."""
        return int(np.asarray(self.cache.end).reshape(-1)[0])

    def _render(self, messages, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def _new_tokens(self, user: dict) -> tuple[list[int], bool]:
        """The tokens the cache lacks for the next turn, and whether they restart the cache."""
        if not self.history:
            return self.tokenizer.encode(self._render([*self.messages, user], True), add_special_tokens=False), True
        reply = self.messages[-1]
        marked = [*self.messages[:-1], {**reply, "content": _MARKER}]
        before = self._render(marked, False)
        after = self._render([*marked, user], True)
        if _MARKER in before and after.startswith(before):
            closing = before[before.rfind(_MARKER) + len(_MARKER) :]
            return self.tokenizer.encode(closing + after[len(before) :], add_special_tokens=False), False
        return self.tokenizer.encode(self._render([*self.messages, user], True), add_special_tokens=False), True

    def _feed(self, ids: list[int], step: int):
        """Put `ids` into the cache: whole chunks through the chunk function, the rest one by one."""
        key = jax.random.fold_in(self._key, step)
        token = None
        i = 0
        while i < len(ids):
            n = self.chunk if len(ids) - i >= self.chunk else 1
            block = jnp.asarray(ids[i : i + n], jnp.int32)
            token, self.cache, self._seen = _feed(self.model, self.cache, self._seen, block, key, self._values)
            i += n
        self.history.extend(ids)
        return token

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add a user message, generate the assistant's reply (streamed to `on_text` piece by
        piece) and return it. Raises `ValueError` when the conversation no longer fits
        `max_length` (call `reset`)."""
        user = {"role": "user", "content": text}
        new, restart = self._new_tokens(user)
        if restart and self.history:
            self.history, self.cache = [], _init_cache(self.model, self.max_length)
            self._seen = jnp.zeros(self._vocab, bool)
            reprefilled = True
        else:
            reprefilled = False
        if len(self.history) + len(new) + self.max_new_tokens > self.max_length:
            raise ValueError(
                f"the conversation would exceed {self.max_length} tokens ({len(self.history)} held, {len(new)} new, "
                f"{self.max_new_tokens} to generate); start a new one."
            )
        step = len(self.history)
        token = self._feed(new, step)
        prompt_end = len(self.history)
        stream = self.tokenizer.stream_decoder()
        pieces, generated = [], []
        while True:
            token = int(token)
            generated.append(token)
            produced = len(generated)
            if token in self.stop_ids:
                break
            piece = stream.push(token)
            if piece:
                pieces.append(piece)
                if on_text is not None:
                    on_text(piece)
            if produced >= self.max_new_tokens:
                self._feed([token], step + produced)  # its key/value belong in the cache
                break
            token = self._feed([token], step + produced)
        tail = stream.flush()
        if tail:
            pieces.append(tail)
            if on_text is not None:
                on_text(tail)
        answer = "".join(pieces)
        self.messages += [user, {"role": "assistant", "content": answer}]
        self.turn_stats.append(TurnStats(len(new), prompt_end, generated, self.cache_end, reprefilled))
        return answer


def run(session: ChatSession, *, read: Callable[[str], str] = input, write: Callable[[str], None] | None = None) -> int:
    """The interactive loop: `read(prompt)` a line, stream the reply with `write`, repeat.

    Ctrl-D (EOF) or Ctrl-C ends it cleanly (exit status 0). `/reset` starts a new conversation.
    """

    def out(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    write = write or out
    try:
        while True:
            try:
                line = read(">>> ")
            except EOFError:
                write("\n")
                return 0
            if not line.strip():
                continue
            if line.strip() == "/reset":
                session.reset()
                write("[new conversation]\n")
                continue
            try:
                session.reply(line, on_text=write)
            except ValueError as e:
                write(f"\n[{e}]\n")
                continue
            write("\n")
    except KeyboardInterrupt:
        write("\n")
        return 0
