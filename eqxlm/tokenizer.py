"""Text in and out: a checkpoint's tokenizer, its chat template, and a stream decoder.

`load_tokenizer(path_or_repo_id)` reads a Hugging Face tokenizer folder with the `tokenizers`
library alone (no transformers):

- `tokenizer.json`: the vocabulary, pre-tokenizer, post-processor and decoder;
- `tokenizer_config.json` (and the older `special_tokens_map.json`): the special tokens
  (`bos_token`, `eos_token`, `pad_token`, `unk_token`, ...), `add_bos_token` /
  `add_eos_token`, `padding_side`, `model_max_length`, `clean_up_tokenization_spaces`, extra
  `added_tokens_decoder` entries and the `chat_template`;
- `chat_template.jinja`, which newer checkpoints ship instead of (and which then wins over) the
  config's `chat_template`.

It behaves as transformers' `PreTrainedTokenizerFast` (`TokenizersBackend` in transformers 5)
on the same folder: `encode` adds the same special tokens (when `add_bos_token`/`add_eos_token`
is given, or the file has no post-processor, the post-processor is rebuilt from them exactly as
transformers' `update_post_processor` does), and `apply_chat_template` renders the template
with Jinja2 in the same sandbox, with the same variables, filters and globals, then encodes
the text without adding special tokens, so the ids are transformers' ids (tested against
transformers for Llama 3, Mistral, ChatML/Qwen2 and Gemma templates).

**The sandbox.** Chat templates come from the hub and are untrusted code. They are rendered in
`jinja2.sandbox.ImmutableSandboxedEnvironment` (no attribute that reaches Python internals, no
mutation of the inputs), and eqxlm is stricter than Jinja's default in two ways that change
nothing for a legitimate template: a template that names a dunder attribute (`__class__`,
`__mro__`, `__subclasses__`, `__globals__`, ...) is refused before it renders, and an unsafe
attribute access fails instead of rendering as an empty string.

**The bounds.** A rendering is also bounded, so that a template cannot hang the program or
fill its memory; real templates render in well under a millisecond and are nowhere near them:

- `MAX_LOOP_ITERATIONS` loop iterations in all (every `{% for %}`, recursive loops included,
  and every item of every `range(...)`), and `MAX_RANGE` items in one `range`;
- `MAX_CHARS` characters of output (rendered as a stream, stopped as soon as it passes), and
  as the length of any string or list that an operator (`*`, `+`, `~`, `%`), a filter or a
  method call builds; an integer argument above it to a string or list method, or to a
  width-taking filter (`center`, `indent`, ...), is refused before it runs;
- `MAX_INT_BITS` bits for an integer that `*` or `**` builds;
- `MAX_CALL_DEPTH` nested calls (a macro that recurses without end);
- `MAX_RENDER_SECONDS` of rendering, checked at every loop iteration and call.

Every failure, a syntax error, an undefined value, the template's own `raise_exception(...)`,
a bound, or any exception the template's code raises, is a `ChatTemplateError` whose message
names the template (its file, or `chat_template` in the `tokenizer_config.json` it came from),
the template line when known, and what happened.
"""

import json
import os
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache, wraps
from pathlib import Path
from typing import Any

import tokenizers

#: Special-token attributes, in transformers' order (`SPECIAL_TOKENS_ATTRIBUTES`); each is
#: passed to a chat template under its own name when set.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CHAT_TEMPLATE_FILE = "chat_template.jinja"

#: Bounds on one chat-template rendering (see the module docstring); each is far above what a
#: real template uses.
MAX_LOOP_ITERATIONS = 1_000_000
MAX_RANGE = 100_000  # Jinja's sandbox's own bound on one `range`
MAX_CHARS = 10_000_000  # output characters, and the length of any string or list a template builds
MAX_INT_BITS = 65_536
MAX_CALL_DEPTH = 100
MAX_RENDER_SECONDS = 10.0


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be read as it is; the message names the file and field."""


class ChatTemplateError(ValueError):
    """A chat template that cannot be rendered: a syntax error, its own `raise_exception`, an
    attempt to reach outside the sandbox, a bound passed, or any other failure of its code. The
    message names the template (its file, or the config it came from)."""


def _token_content(value: Any, where: str) -> str | None:
    """A special token as written in a config: a string, or an `AddedToken` dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{where}: expected a token string or {{'content': ...}}, found {value!r}.")


# --------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """What a template may see: plain JSON-like data only (as transformers' `_plain_template_data`),
    so no object with methods the sandbox does not know about ever reaches it."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item) and type(value).__module__ == "numpy":
        return _plain(item())
    return f"<{type(value).__name__}>"


def _forbidden_names(ast) -> list[tuple[str, int]]:
    """Dunder attributes and keys a template names (`x.__class__`, `x['__globals__']`)."""
    from jinja2 import nodes

    found = []
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            name = node.arg.value
        else:
            continue
        if name.startswith("__"):
            found.append((name, node.lineno))
    return found


class _Limit(Exception):
    """A bound of the rendering passed (internal: it becomes a `ChatTemplateError`). Not a
    `ValueError`/`TypeError`, so no filter's own `except` can swallow it."""


class _Budget:
    """What one rendering has used so far (`_RENDERING` holds the current one)."""

    def __init__(self):
        self.iterations = 0
        self.depth = 0
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS

    def step(self, n: int = 1) -> None:
        self.iterations += n
        if self.iterations > MAX_LOOP_ITERATIONS:
            raise _Limit(f"more than {MAX_LOOP_ITERATIONS:,} loop iterations (the bound on a chat template's loops).")
        if time.monotonic() > self.deadline:
            raise _Limit(f"rendering took more than {MAX_RENDER_SECONDS:g} s (the bound on a chat template).")


_RENDERING: ContextVar[_Budget | None] = ContextVar("eqxlm_chat_template_budget", default=None)


def _budget() -> _Budget:
    budget = _RENDERING.get()
    if budget is None:  # a compiled template rendered some other way would run unbounded
        raise RuntimeError("chat templates render through eqxlm.tokenizer.render_chat_template, which bounds them.")
    return budget


def _check_size(value: Any, what: str) -> Any:
    """`value`, unless it is a string/list longer than `MAX_CHARS` or an integer over `MAX_INT_BITS`."""
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_CHARS:
        raise _Limit(f"{what} built a {type(value).__name__} of {len(value):,} items, over the bound of {MAX_CHARS:,}.")
    if type(value) is int and value.bit_length() > MAX_INT_BITS:
        raise _Limit(f"{what} built an integer of {value.bit_length():,} bits, over the bound of {MAX_INT_BITS:,}.")
    return value


def _check_length(n: int, what: str) -> None:
    """Refuse to build a string or list of `n` items when `n` is over `MAX_CHARS`."""
    if n > MAX_CHARS:
        raise _Limit(f"{what} would build a string or list of {n:,} items, over the bound of {MAX_CHARS:,}.")


def _check_widths(args: Iterable[Any], what: str) -> None:
    """Refuse an integer argument that would make a string or list over `MAX_CHARS` at once."""
    for a in args:
        if type(a) is int and abs(a) > MAX_CHARS:
            raise _Limit(f"{what} was given {a:,}, over the bound of {MAX_CHARS:,} on what a template builds.")


#: Filters whose integer arguments size their result (`'x' | center(10**9)`).
_WIDTH_FILTERS = frozenset({"batch", "center", "indent", "slice", "tojson", "wordwrap"})


def _bounded_filter(name: str, f):
    # The arguments after the filtered value (and after the context Jinja passes first to a
    # `pass_context`/`pass_environment` filter): `{{ 10**9 | tojson }}` is no width.
    skip = 1 if getattr(f, "jinja_pass_arg", None) is None else 2

    @wraps(f)  # keeps Jinja's `pass_context`/`pass_eval_context` marks
    def bounded(*args, **kwargs):
        if name in _WIDTH_FILTERS:
            _check_widths((*args[skip:], *kwargs.values()), f"filter `{name}`")
        return _check_size(f(*args, **kwargs), f"filter `{name}`")

    return bounded


class _Refused(Exception):
    """A template refused before it renders (internal: it becomes a `ChatTemplateError`)."""


@lru_cache(maxsize=32)
def _compile_chat_template(template: str):
    """Compile a chat template in the bounded sandbox (cached by text), refusing dunder access.

    The environment is transformers' (`_compile_jinja_template`): `ImmutableSandboxedEnvironment`
    with `trim_blocks`, `lstrip_blocks` and loop controls; filter `tojson` (non-ASCII kept,
    `indent`/`separators`/`sort_keys`); globals `raise_exception`, `strftime_now`, `dict`,
    `namespace` (no underscore-prefixed names); plus a no-op `{% generation %}` block tag. Every
    `{% for %}` iterates through `bounded_iter` and every `~` joins through `bounded_concat`;
    the sandbox's `call` and `call_binop` hooks check the rest of the bounds. Render it with
    `render_chat_template` only: the bounds count against the rendering it starts.
    """
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.runtime import LoopContext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class BoundedCodeGenerator(CodeGenerator):
        def visit_Concat(self, node, frame):  # `a ~ b`: joined by the environment, which checks the size
            self.write("environment.bounded_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        code_generator_class = BoundedCodeGenerator
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def unsafe_undefined(self, obj, attribute):  # fail now, not as an empty string later
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe.")

        def bounded_iter(self, iterable):
            budget = _budget()
            for item in iterable:
                budget.step()
                yield item

        def bounded_concat(self, parts):
            parts = [str(p) for p in parts]  # as Jinja's `str_join`
            _check_length(sum(map(len, parts)), "`~`")
            return "".join(parts)

        def call_binop(self, context, operator, left, right):
            seq = (str, list, tuple)
            if operator == "*":  # the size is known before the product is made
                for items, n in ((left, right), (right, left)):
                    if isinstance(items, seq) and type(n) is int:
                        _check_length(len(items) * n, "`*`")
                if type(left) is int and type(right) is int and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                    raise _Limit(f"`*` would build an integer of about {left.bit_length() + right.bit_length():,} bits.")
            elif operator == "**" and type(left) is int and type(right) is int and abs(left) > 1 and right > 0:
                if (abs(left).bit_length() - 1) * right > MAX_INT_BITS:
                    raise _Limit(f"`**` would build an integer of over {MAX_INT_BITS:,} bits ({left} ** {right}).")
            elif operator == "+" and isinstance(left, seq) and isinstance(right, seq):
                _check_length(len(left) + len(right), "`+`")
            return _check_size(super().call_binop(context, operator, left, right), f"`{operator}`")

        def call(self, context, obj, /, *args, **kwargs):
            budget = _budget()
            if isinstance(getattr(obj, "__self__", None), (str, list, tuple)):  # 'x'.center(10**9)
                _check_widths((*args, *kwargs.values()), f"`{getattr(obj, '__name__', 'method')}`")
            if isinstance(obj, LoopContext) and args:  # `loop(children)` in a recursive loop
                args = (self.bounded_iter(args[0]), *args[1:])
            budget.step(0)  # the clock
            budget.depth += 1
            try:
                if budget.depth > MAX_CALL_DEPTH:
                    raise _Limit(f"calls nested more than {MAX_CALL_DEPTH} deep (a macro that recurses without end?).")
                return _check_size(super().call(context, obj, *args, **kwargs), "a call")
            finally:
                budget.depth -= 1

    def bounded_range(*args):
        if len(args) > 3 or not all(type(a) is int for a in args):
            return range(*args)  # Python's own TypeError
        items = range(*args)
        if len(items) > MAX_RANGE:
            raise _Limit(f"range of {len(items):,} items, over the bound of {MAX_RANGE:,}.")
        _budget().step(len(items))  # counted when made: a filter may consume it without a loop
        return items

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"a chat template cannot store the underscore-prefixed attribute {name!r} on a namespace.")

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals["range"] = bounded_range
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    ast = env.parse(template)  # a TemplateSyntaxError is named by the caller
    bad = _forbidden_names(ast)
    if bad:
        listed = ", ".join(f"`{name}` (line {line})" for name, line in bad)
        raise _Refused(f"refused: it accesses {listed}, Python internals outside the sandbox that no chat template needs.")
    for loop in ast.find_all(nodes.For):
        guard = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [loop.iter], [], None, None)
        loop.iter = guard.set_lineno(loop.iter.lineno)
    return env.from_string(ast)


def _template_line(error: BaseException) -> int | None:
    """The template line an exception came from (Jinja rewrites tracebacks to `<template>` lines)."""
    line = None
    for frame in traceback.extract_tb(error.__traceback__):
        if frame.filename == "<template>":
            line = frame.lineno
    return line


def _template_failure(error: BaseException) -> str:
    """What went wrong, in a phrase, for any exception a rendering raised."""
    from jinja2.exceptions import SecurityError, TemplateError, UndefinedError

    if isinstance(error, (_Limit, _Refused)):
        return str(error)
    if isinstance(error, SecurityError):
        return f"refused: it tried to reach outside the sandbox ({error})"
    if isinstance(error, UndefinedError):
        return f"undefined value: {error}"
    if isinstance(error, TemplateError):
        return f"the template raised an error: {error}"
    if isinstance(error, RecursionError):
        return "it recursed deeper than Python allows (a macro that recurses without end?)"
    if isinstance(error, MemoryError):
        return "it ran out of memory"
    return f"{type(error).__name__}: {error}"


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    source: str = "chat template",
    **variables: Any,
) -> str:
    """Render `template` for one conversation, as transformers' `render_jinja_template`, within
    the bounds in this module's docstring.

    `messages`: dicts with `role` and `content` (keys whose value is `None` are dropped, as
    transformers does); `variables`: the special tokens (`bos_token`, `eos_token`, ...) and any
    extra template variables (`date_string`, `enable_thinking`, ...); `source`: where the
    template came from, for messages. Raises `ChatTemplateError`.
    """
    import jinja2

    if not messages:
        raise ChatTemplateError("cannot apply a chat template to an empty conversation; give at least one message.")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"messages[{i}]: expected a dict with 'role' and 'content', found {type(message).__name__}.")
        chat.append(_plain({k: v for k, v in message.items() if v is not None}))
    if documents is not None and not all(isinstance(d, Mapping) for d in documents):
        raise ChatTemplateError("documents: expected a list of dicts with 'title' and 'text' keys.")
    try:
        compiled = _compile_chat_template(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{source}, line {e.lineno}: syntax error: {e.message}") from None
    except _Refused as e:
        raise ChatTemplateError(f"{source}: {e}") from None
    stream = compiled.generate(
        messages=chat,
        tools=_plain(list(tools)) if tools is not None else None,
        documents=_plain(list(documents)) if documents is not None else None,
        add_generation_prompt=add_generation_prompt,
        **_plain(variables),
    )
    token = _RENDERING.set(_Budget())
    try:
        pieces, size = [], 0
        for piece in stream:
            size += len(piece)
            if size > MAX_CHARS:
                raise _Limit(f"its output passed {MAX_CHARS:,} characters (the bound on a chat template's output).")
            pieces.append(piece)
        return "".join(pieces)
    except Exception as e:  # untrusted code: whatever it raised is the template's failure
        line = _template_line(e)
        where = f"{source}, line {line}" if line is not None else source
        raise ChatTemplateError(f"{where}: {_template_failure(e)}") from None
    finally:
        stream.close()
        _RENDERING.reset(token)


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


class StreamDecoder:
    """Turns tokens arriving one at a time into text pieces, never a broken character.

    `push(token)` returns the new text (possibly `""`). Text is held back while the decoded
    tail ends in U+FFFD (an incomplete UTF-8 sequence: byte-level BPE and sentencepiece byte
    fallback both split characters over tokens), and each piece is decoded with a few tokens of
    context before it, so a sentencepiece `▁` becomes a space mid-stream even though its decoder
    strips the first one of a sequence. The concatenated pieces equal `decode(all tokens)`.
    `flush()` returns what is still held back at the end (a truly invalid byte sequence, shown
    as U+FFFD as `decode` shows it).

    The same algorithm as text-generation-inference's and vLLM's incremental detokenizers.
    """

    def __init__(self, tokenizer: "Tokenizer", *, skip_special_tokens: bool = True):
        self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        self.tokens: list[int] = []
        self._prefix = 0  # decoded as context only
        self._read = 0  # tokens whose text has been emitted
        self._started = False

    def push(self, token: int) -> str:
        self.tokens.append(int(token))
        if not self._started:  # the first piece is decoded on its own, as decode() does
            text = self._decode(self.tokens)
            if not text or text.endswith("\ufffd"):
                return ""
            self._started = True
            self._prefix, self._read = 0, len(self.tokens)
            return text
        before = self._decode(self.tokens[self._prefix : self._read])
        after = self._decode(self.tokens[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
            self._prefix, self._read = self._read, len(self.tokens)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        if not self._started:
            text = self._decode(self.tokens)
            self._started, self._prefix, self._read = True, 0, len(self.tokens)
            return text
        before = self._decode(self.tokens[self._prefix : self._read])
        after = self._decode(self.tokens[self._prefix :])
        self._prefix, self._read = self._read, len(self.tokens)
        return after[len(before) :] if after.startswith(before) else ""


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------


def _cleanup(text: str) -> str:
    """transformers' `clean_up_tokenization` (spaces before punctuation and contractions)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(a, b)
    return text


@dataclass
class Tokenizer:
    """A checkpoint's tokenizer: `tokenizers.Tokenizer` plus what `tokenizer_config.json` says.

    Build it with `load_tokenizer`. Special tokens are strings (`bos_token`, ...) with their ids
    (`bos_token_id`, ...; `None` when unset or not in the vocabulary).
    """

    backend: tokenizers.Tokenizer
    special_tokens: dict[str, str] = field(default_factory=dict)
    add_bos_token: bool = False
    add_eos_token: bool = False
    padding_side: str = "right"
    model_max_length: int | None = None
    clean_up_tokenization_spaces: bool = False
    chat_template: str | None = None
    name: str = ""
    #: Where `chat_template` came from, for error messages (its file, or the config that holds it).
    chat_template_source: str = "chat template"

    def _id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    bos_token = property(lambda self: self.special_tokens.get("bos_token"))
    eos_token = property(lambda self: self.special_tokens.get("eos_token"))
    pad_token = property(lambda self: self.special_tokens.get("pad_token"))
    unk_token = property(lambda self: self.special_tokens.get("unk_token"))
    bos_token_id = property(lambda self: self._id("bos_token"))
    eos_token_id = property(lambda self: self._id("eos_token"))
    pad_token_id = property(lambda self: self._id("pad_token"))
    unk_token_id = property(lambda self: self._id("unk_token"))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> set[int]:
        """Ids of every added token marked special (what `decode(skip_special_tokens=True)` drops)."""
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, the BOS/EOS the post-processor adds."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (as transformers' `decode`, including its space clean-up when the config
        asks for it and the model is not BPE)."""
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            text = _cleanup(text)
        return text

    def stream_decoder(self, *, skip_special_tokens: bool = True) -> StreamDecoder:
        """A fresh `StreamDecoder` over this tokenizer."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        chat_template: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **variables: Any,
    ) -> list[int] | str:
        """Render a conversation with the chat template and (by default) encode it.

        Equals transformers' `tokenizer.apply_chat_template(messages, add_generation_prompt=...,
        tokenize=...)["input_ids"]`: the special tokens are template variables under their names
        (`bos_token`, `eos_token`, ...; `variables` override them), and the text is encoded
        without adding special tokens (the template writes them).
        """
        template = chat_template or self.chat_template
        source = "the chat_template argument" if chat_template else self.chat_template_source
        if template is None:
            raise ChatTemplateError(
                f"{self.name or 'this tokenizer'} has no chat template (no `chat_template` in tokenizer_config.json and no "
                f"{CHAT_TEMPLATE_FILE}); pass one with chat_template=..."
            )
        text = render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            source=source,
            **{**self.special_tokens, **variables},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def end_of_turn_ids(self, extra: Iterable[int] = ()) -> set[int]:
        """Token ids that end an assistant turn: EOS, plus the special tokens of the chat template
        that close a turn (`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`, `</s>`, ...), found by
        rendering a one-message conversation and taking the special tokens right after the
        reply's text."""
        ids = set(int(i) for i in extra)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        if self.chat_template is None:
            return ids
        marker = "eqxlm-reply-marker"
        try:
            text = self.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
            )
        except ChatTemplateError:
            return ids
        tail = text[text.rfind(marker) + len(marker) :]
        special = self.all_special_ids
        for token in self.encode(tail, add_special_tokens=False):
            if token in special:
                ids.add(token)
                break
            if self.decode([token]).strip():  # text before any special token: no marker here
                break
        return ids


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}.")
    return data


def load_tokenizer(path_or_repo_id: str | os.PathLike, *, revision: str | None = None) -> Tokenizer:
    """Read a Hugging Face tokenizer folder (or hub repo id, or `"eqxlm/default"`).

    Needs `tokenizer.json`; `tokenizer_config.json`, `special_tokens_map.json` and
    `chat_template.jinja` are read when present. Raises `FileNotFoundError` when there is no
    `tokenizer.json`, `TokenizerError` for a malformed file.
    """
    from .checkpoint import resolve

    folder = resolve(path_or_repo_id, revision=revision)
    path = folder / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no tokenizer.json; eqxlm reads fast (tokenizers-library) tokenizers only.")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:
        raise TokenizerError(f"{path}: the tokenizers library cannot read it ({e}).") from None

    config: dict = {}
    config_path = folder / "tokenizer_config.json"
    if config_path.exists():
        config = _read_json(config_path)
    special_map = _read_json(folder / "special_tokens_map.json") if (folder / "special_tokens_map.json").exists() else {}

    # Added tokens the config declares that tokenizer.json lacks (transformers adds them too).
    declared = config.get("added_tokens_decoder") or {}
    if not isinstance(declared, Mapping):
        raise TokenizerError(f"{config_path}: added_tokens_decoder: expected an object of id -> token, found {declared!r}.")
    known = backend.get_added_tokens_decoder()
    for index, entry in sorted(declared.items(), key=lambda kv: int(kv[0])):
        content = _token_content(entry, f"{config_path}: added_tokens_decoder[{index}]")
        if int(index) in known or backend.token_to_id(content) is not None:
            continue
        token = tokenizers.AddedToken(
            content,
            single_word=entry.get("single_word", False),
            lstrip=entry.get("lstrip", False),
            rstrip=entry.get("rstrip", False),
            normalized=entry.get("normalized", not entry.get("special", False)),
            special=entry.get("special", False),
        )
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])

    special: dict[str, str] = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name, special_map.get(name))
        content = _token_content(value, f"{config_path if name in config else folder / 'special_tokens_map.json'}: {name}")
        if content is not None:
            special[name] = content
    padding = backend.padding
    if "pad_token" not in special and padding is not None and padding.get("pad_token"):
        special["pad_token"] = padding["pad_token"]
    # Special tokens must be special in the backend (decode(skip_special_tokens) drops them).
    missing = [t for t in special.values() if backend.token_to_id(t) is None]
    if missing:
        raise TokenizerError(f"{config_path}: special token(s) {missing} are not in the vocabulary of {path}.")
    backend.add_special_tokens([t for t in special.values() if backend.token_to_id(t) not in backend.get_added_tokens_decoder()])

    add_bos = bool(config.get("add_bos_token", False))
    add_eos = bool(config.get("add_eos_token", False))
    if backend.post_processor is None:
        # No post-processor in tokenizer.json: build one from the flags, as transformers'
        # `update_post_processor` does. (A post-processor in the file is kept as it is, flags or
        # not, as transformers 5.23 keeps it; that is how Llama, Mistral and Gemma ship their BOS.)
        bos, eos = special.get("bos_token"), special.get("eos_token")
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
        pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
        pairs = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        backend.post_processor = tokenizers.processors.TemplateProcessing(single=single, pair=pair, special_tokens=pairs)
    backend.no_padding()
    backend.no_truncation()

    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{config_path}: chat_template: expected a string, found {type(template).__name__}.")
    source = f"chat_template in {config_path}"
    if (folder / CHAT_TEMPLATE_FILE).exists():
        template = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        source = str(folder / CHAT_TEMPLATE_FILE)

    max_length = config.get("model_max_length")
    side = config.get("padding_side", (padding or {}).get("direction", "right"))
    if side not in ("left", "right"):
        raise TokenizerError(f"{config_path}: padding_side: expected 'left' or 'right', found {side!r}.")
    return Tokenizer(
        backend=backend,
        special_tokens=special,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        padding_side=side,
        model_max_length=int(max_length) if isinstance(max_length, (int, float)) and max_length < 1e12 else None,
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        chat_template=template,
        name=str(path_or_repo_id),
        chat_template_source=source,
    )
