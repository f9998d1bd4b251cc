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
attribute access fails instead of rendering as an empty string. Both raise `ChatTemplateError`,
as does a syntax error or the template's own `raise_exception(...)`.
"""

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers

#: Special-token attributes, in transformers' order (`SPECIAL_TOKENS_ATTRIBUTES`); each is
#: passed to a chat template under its own name when set.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CHAT_TEMPLATE_FILE = "chat_template.jinja"


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be read as it is; the message names the file and field."""


class ChatTemplateError(ValueError):
    """A chat template that cannot be rendered: a syntax error, its own `raise_exception`, or an
    attempt to reach outside the sandbox."""


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


@lru_cache(maxsize=32)
def compile_chat_template(template: str):
    """Compile a chat template in the sandbox (cached by text), refusing dunder access.

    The environment is transformers' (`_compile_jinja_template`): `ImmutableSandboxedEnvironment`
    with `trim_blocks`, `lstrip_blocks` and loop controls; filter `tojson` (non-ASCII kept,
    `indent`/`separators`/`sort_keys`); globals `raise_exception`, `strftime_now`, `dict`,
    `namespace` (no underscore-prefixed names); plus a no-op `{% generation %}` block tag.
    """
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.exceptions import SecurityError, TemplateError
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

    class StrictSandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj, attribute):  # fail now, not as an empty string later
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe.")

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

    env = StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        ast = env.parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template line {e.lineno}: syntax error: {e.message}") from None
    bad = _forbidden_names(ast)
    if bad:
        listed = ", ".join(f"`{name}` (line {line})" for name, line in bad)
        raise ChatTemplateError(
            f"chat template refused: it accesses {listed}, Python internals outside the sandbox that no chat template needs."
        )
    return env.from_string(template)


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    **variables: Any,
) -> str:
    """Render `template` for one conversation, as transformers' `render_jinja_template`.

    `messages`: dicts with `role` and `content` (keys whose value is `None` are dropped, as
    transformers does); `variables`: the special tokens (`bos_token`, `eos_token`, ...) and any
    extra template variables (`date_string`, `enable_thinking`, ...). Raises `ChatTemplateError`.
    """
    from jinja2.exceptions import SecurityError, TemplateError

    if not messages:
        raise ChatTemplateError("cannot apply a chat template to an empty conversation; give at least one message.")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"messages[{i}]: expected a dict with 'role' and 'content', found {type(message).__name__}.")
        chat.append(_plain({k: v for k, v in message.items() if v is not None}))
    if documents is not None and not all(isinstance(d, Mapping) for d in documents):
        raise ChatTemplateError("documents: expected a list of dicts with 'title' and 'text' keys.")
    compiled = compile_chat_template(template)
    try:
        return compiled.render(
            messages=chat,
            tools=_plain(list(tools)) if tools is not None else None,
            documents=_plain(list(documents)) if documents is not None else None,
            add_generation_prompt=add_generation_prompt,
            **_plain(variables),
        )
    except SecurityError as e:
        raise ChatTemplateError(f"chat template refused: it tried to reach outside the sandbox ({e})") from None
    except TemplateError as e:
        raise ChatTemplateError(f"chat template error: {e}") from None


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
    if (folder / CHAT_TEMPLATE_FILE).exists():
        template = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")

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
    )
