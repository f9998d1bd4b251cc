"""eqxlm.tokenizer against transformers' PreTrainedTokenizerFast on the same folders.

Tokenizers are built here: a byte-level BPE trained on a few sentences, and a sentencepiece-style
BPE (`▁` word marks, byte fallback) made from a vocabulary; both carry the special tokens of
every stored template. Templates: tests/data/chat_templates/*.jinja (Llama 3, Llama 3.1 with
tools, Mistral instruct, Qwen2/ChatML, Gemma, Gemma 2 with a system prompt).
"""

import copy
import json
from pathlib import Path

import jinja2
import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from eqxlm.tokenizer import ChatTemplateError, TokenizerError, load_tokenizer, render_chat_template

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
SPECIALS = [
    "<|endoftext|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>",
    "<|im_end|>", "<s>", "</s>", "<unk>", "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>",
]  # fmt: skip
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world! How are you today?",
    "You are a helpful assistant. Answer briefly and politely, with one sentence.",
    "def add(a, b):\n    return a + b  # the sum of two numbers",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "user assistant system model tool ipython function parameters name",
]
# name -> (template file, tokenizer_config special tokens and flags)
FAMILIES = {
    "llama3": ("llama3.jinja", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "llama3_1_tools": ("llama3_1_tools.jinja", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "mistral": ("mistral_instruct.jinja", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}),
    "qwen2": ("qwen2_chatml.jinja", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "gemma": ("gemma.jinja", {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True}),
    "gemma2_system": ("gemma2_system.jinja", {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}),
}
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Réponds en français."}
U1 = {"role": "user", "content": "Hello! What is the capital of France?"}
A1 = {"role": "assistant", "content": "  Paris is the capital of France.  "}
U2 = {"role": "user", "content": "And of Germany? 🇩🇪 Ünïcödé, tabs\tand\nnewlines."}
A2 = {"role": "assistant", "content": "Berlin."}
CONVERSATIONS = {
    "one_user": [U1],
    "system_user": [SYSTEM, U1],
    "system_multi_turn": [SYSTEM, U1, A1, U2],
    "multi_turn_no_system": [U1, A1, U2],
    "ends_with_assistant": [U1, A1, U2, A2],
    "special_text_in_content": [{"role": "user", "content": "What does <|im_end|> or </s> mean?"}],
}


def byte_level_tokenizer() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def sentencepiece_tokenizer() -> tokenizers.Tokenizer:
    """Llama-2/Mistral style: `▁` for spaces, byte fallback for characters not in the vocabulary."""
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    pieces = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?;:'\"()[]{}<>/|_-=+#*\n\t") + ["▁"]
    words = ["▁the", "▁is", "▁of", "▁capital", "▁France", "▁Hello", "he", "ll", "llo", "▁you", "▁are", "▁a", "er", "in", "an"]
    for p in pieces + words:
        vocab.setdefault(p, len(vocab))
    merges = []
    for w in words:  # merges that build each word left to right
        for i in range(2, len(w) + 1):
            left, right = w[: i - 1], w[i - 1]
            if left in vocab and right in vocab and w[:i] in vocab:
                merges.append((left, right))
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def write_folder(folder: Path, backend: tokenizers.Tokenizer, config: dict, template: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    full = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
    if template is not None:
        full["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(full, indent=2))
    return folder


@pytest.fixture(scope="module")
def backends():
    return {"bytelevel": byte_level_tokenizer(), "sentencepiece": sentencepiece_tokenizer()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, backends):
    root = tmp_path_factory.mktemp("tokenizers")
    out = {}
    for kind, backend in backends.items():
        for family, (file, config) in FAMILIES.items():
            if config.get("add_bos_token"):  # as Mistral and Gemma ship it: the BOS in tokenizer.json's post-processor
                backend = copy.deepcopy(backend)
                bos = config["bos_token"]
                backend.post_processor = processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
                )
            out[kind, family] = write_folder(root / kind / family, backend, config, (TEMPLATES / file).read_text())
    return out


def oracle(folder):
    return AutoTokenizer.from_pretrained(folder)


def hf_ids(hf, messages, **kwargs):
    return hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


@pytest.mark.parametrize("kind", ["bytelevel", "sentencepiece"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chat_template_ids_match_transformers(folders, kind, family):
    folder = folders[kind, family]
    ours, hf = load_tokenizer(folder), oracle(folder)
    compared = 0
    for name, messages in CONVERSATIONS.items():
        for generation_prompt in (True, False):
            try:
                expected = hf_ids(hf, messages, add_generation_prompt=generation_prompt)
            except jinja2.TemplateError as e:  # the template refuses this conversation: we must too, with its message
                with pytest.raises(ChatTemplateError, match=str(e).replace("/", ".").replace(".", r"\.")):
                    ours.apply_chat_template(messages, add_generation_prompt=generation_prompt)
                continue
            got = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt)
            assert got == expected, (family, kind, name, generation_prompt)
            text = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
            assert text == hf.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
            compared += 1
    assert compared >= 6  # every template renders most conversations (Gemma 1 refuses the system ones)


def test_tools_and_extra_variables_match_transformers(folders):
    folder = folders["bytelevel", "llama3_1_tools"]
    ours, hf = load_tokenizer(folder), oracle(folder)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city, in °C.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    call = {
        "role": "assistant",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    }
    tool_reply = {"role": "tool", "content": {"temperature": 21}}
    for messages in ([SYSTEM, U1], [SYSTEM, U1, call, tool_reply]):
        for kwargs in ({}, {"tools_in_user_message": False}, {"date_string": "01 Jan 2026"}):
            got = ours.apply_chat_template(messages, tools=tools, add_generation_prompt=True, **kwargs)
            assert got == hf_ids(hf, messages, tools=tools, add_generation_prompt=True, **kwargs)
    # documents pass through (this template ignores them, so the ids equal the no-documents ones)
    docs = [{"title": "t", "text": "x"}]
    assert ours.apply_chat_template([U1], documents=docs) == hf_ids(hf, [U1], documents=docs)


@pytest.mark.parametrize("kind", ["bytelevel", "sentencepiece"])
def test_encode_decode_and_special_tokens_match_transformers(folders, kind):
    texts = ["Hello world!", " leading space", "naïve café 😀 — Ünïcödé", "<s> [INST] hi [/INST]</s>", "a\n\tb  c", ""]
    for family in ("mistral", "gemma", "qwen2", "llama3"):
        folder = folders[kind, family]
        ours, hf = load_tokenizer(folder), oracle(folder)
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            assert getattr(ours, name) == getattr(hf, name), (family, name)
            assert getattr(ours, name + "_id") == getattr(hf, name + "_id"), (family, name)
        for text in texts:
            for special in (True, False):
                ids = ours.encode(text, add_special_tokens=special)
                assert ids == hf.encode(text, add_special_tokens=special), (family, text, special)
                for skip in (True, False):
                    assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_add_bos_token_without_post_processor(tmp_path, backends):
    """A tokenizer.json without a post-processor: the flags say what `encode` adds."""
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": True}
    tok = load_tokenizer(write_folder(tmp_path / "flags", backends["bytelevel"], config, None))
    plain = tok.encode("Hello", add_special_tokens=False)
    assert tok.encode("Hello") == [tok.bos_token_id, *plain, tok.eos_token_id]
    assert tok.add_bos_token and tok.add_eos_token


@pytest.mark.parametrize("family", ["llama3", "qwen2", "gemma", "mistral"])
def test_end_of_turn_ids(folders, family):
    tok = load_tokenizer(folders["bytelevel", family])
    names = {"llama3": ["<|eot_id|>"], "qwen2": ["<|im_end|>"], "gemma": ["<end_of_turn>", "<eos>"], "mistral": ["</s>"]}[family]
    assert tok.end_of_turn_ids() == {tok.backend.token_to_id(n) for n in names}


def test_chat_template_jinja_file_wins_and_default_model(tmp_path, backends):
    folder = write_folder(tmp_path / "t", backends["bytelevel"], FAMILIES["qwen2"][1], "{{ 'from config' }}")
    (folder / "chat_template.jinja").write_text((TEMPLATES / "qwen2_chatml.jinja").read_text())
    ours, hf = load_tokenizer(folder), oracle(folder)
    assert ours.apply_chat_template([U1], add_generation_prompt=True) == hf_ids(hf, [U1], add_generation_prompt=True)
    default, hf_default = load_tokenizer("eqxlm/default"), oracle(_default_folder())
    assert (default.bos_token_id, default.eos_token_id, default.pad_token_id) == (0, 0, 0)
    for messages in CONVERSATIONS.values():
        for generation_prompt in (True, False):
            got = default.apply_chat_template(messages, add_generation_prompt=generation_prompt)
            assert got == hf_ids(hf_default, messages, add_generation_prompt=generation_prompt)


def _default_folder():
    from eqxlm import default_model_path

    return default_model_path()


ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__ }}",
    "{{ cycler['__init__']['__globals__'] }}",
    "{{ raise_exception.__globals__ }}",
]
RUNTIME_ESCAPES = [
    "{% set a = '__cla' ~ 'ss__' %}{{ messages | attr(a) }}",  # computed name: caught by the sandbox at run time
    "{{ messages.append({'role': 'x'}) }}",  # mutating the inputs
    "{{ (messages[0]).update({'a': 1}) }}",
    "{% set ns = namespace(_hidden=1) %}",
    "{{ bos_token.format.__self__ }}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_sandbox_refuses_dunder_access_before_rendering(template):
    with pytest.raises(ChatTemplateError, match="refused: it accesses `__"):
        render_chat_template(template, [U1], bos_token="<s>")


@pytest.mark.parametrize("template", RUNTIME_ESCAPES)
def test_sandbox_refuses_unsafe_calls_at_runtime(template):
    with pytest.raises(ChatTemplateError, match="refused"):
        render_chat_template(template, [U1], bos_token="<s>")


def test_template_errors_are_named():
    with pytest.raises(ChatTemplateError, match="chat template, line 1: the template raised an error: roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", [U1])
    with pytest.raises(ChatTemplateError, match="line 2: syntax error"):
        render_chat_template("ok\n{% for m in messages %}", [U1])
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        render_chat_template("x", [])


# The abusive templates (a template arrives with a downloaded checkpoint), and the other
# ways to ask for unbounded work: each must stop at once with a ChatTemplateError naming the file.
ABUSIVE = {
    "nested_range_loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                           "more than 1,000,000 loop iterations"),
    "nested_string_loops": ("{% set s = 'x' * 100000 %}{% for i in s %}{% for j in s %}{% endfor %}{% endfor %}",
                            "more than 1,000,000 loop iterations"),
    "recursive_loop": ("{% for x in [[1]] recursive %}{{ loop([[1]]) }}{% endfor %}", "nested more than 100 deep"),
    "string_times_huge": ("{{ 'x' * 10**8 }}", "`\\*` would build a string or list of 100,000,000 items"),
    "huge_range": ("{{ range(10**9) | length }}", "range of 1,000,000,000 items"),
    "recursing_macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "nested more than 100 deep"),
    "doubling_in_a_loop": ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
                           "`~` would build"),
    "doubling_list": ("{% set ns = namespace(s=[1]) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
                      "`\\+` would build"),
    "huge_power": ("{{ 10 ** (10 ** 10) }}", "integer of over 65,536 bits"),
    "squaring": ("{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}", "bits"),
    "wide_filter": ("{{ 'x' | center(10**9) }}", "filter `center` was given 1,000,000,000"),
    "wide_method": ("{{ 'x'.ljust(10**9) }}", "`ljust` was given 1,000,000,000"),
    "long_output": ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "output passed 10,000,000 characters"),
    "float_overflow": ("{{ 2.0 ** 10000 }}", "OverflowError"),
    "division_by_zero": ("{{ 1 // 0 }}", "ZeroDivisionError"),
    "undefined": ("{{ nothing.here }}", "undefined value: 'nothing' is undefined"),
}  # fmt: skip


@pytest.fixture(scope="module")
def abusive_folder(tmp_path_factory, backends):
    return write_folder(tmp_path_factory.mktemp("abusive"), backends["bytelevel"], FAMILIES["qwen2"][1], "x")


@pytest.mark.parametrize("case", sorted(ABUSIVE))
def test_abusive_templates_stop_at_once_naming_the_template(abusive_folder, case):
    import time

    template, what = ABUSIVE[case]
    config = json.loads((abusive_folder / "tokenizer_config.json").read_text())
    (abusive_folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    start = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=f"^chat_template in {abusive_folder / 'tokenizer_config.json'}.*: .*{what}"):
        load_tokenizer(abusive_folder).apply_chat_template([U1])
    assert time.perf_counter() - start < 5  # the bounds stop it; without them it runs until killed or out of memory


def test_every_loop_and_character_counts(monkeypatch):
    """With small bounds: each kind of loop counts its iterations (a range when it is made),
    and the output stops at the bound."""
    import eqxlm.tokenizer as module

    monkeypatch.setattr(module, "MAX_LOOP_ITERATIONS", 10)
    monkeypatch.setattr(module, "MAX_CHARS", 100)
    eleven = [U1] * 11
    assert render_chat_template("{% for m in messages %}.{% endfor %}", [U1] * 10) == "." * 10
    for template, messages in [
        ("{% for m in messages %}{% endfor %}", eleven),
        ("{% for c in 'abcdefghijk' %}{% endfor %}", [U1]),
        ("{% for x in [[1, 2, 3], [4, 5, 6], [7, 8, 9]] recursive %}{{ loop(x) if x is iterable }}{% endfor %}", [U1]),
        ("{{ range(11) | join }}", [U1]),
    ]:
        with pytest.raises(ChatTemplateError, match="more than 10 loop iterations"):
            render_chat_template(template, messages)
    with pytest.raises(ChatTemplateError, match="output passed 100 characters"):
        render_chat_template("{% for m in messages %}{{ 'x' * 50 }}{% endfor %}", [U1] * 3)


def test_template_source_is_named(tmp_path, backends):
    folder = write_folder(tmp_path / "t", backends["bytelevel"], FAMILIES["qwen2"][1], "{{ raise_exception('from the config') }}")
    tok, config = load_tokenizer(folder), folder / "tokenizer_config.json"
    with pytest.raises(ChatTemplateError, match=f"^chat_template in {config}, line 1: .*from the config"):
        tok.apply_chat_template([U1])
    with pytest.raises(ChatTemplateError, match="^the chat_template argument, line 2: syntax error"):
        tok.apply_chat_template([U1], chat_template="ok\n{% if %}")
    (folder / "chat_template.jinja").write_text("\n\n{{ messages[0].nothing.here }}")
    with pytest.raises(ChatTemplateError, match=f"^{folder / 'chat_template.jinja'}, line 3: undefined value"):
        load_tokenizer(folder).apply_chat_template([U1])


def test_large_numbers_in_the_data_are_not_widths():
    """The width bounds look at a filter's arguments, not at the value it filters."""
    template = "{{ messages[0]['n'] | tojson }} {{ messages[0]['n'] * 2 }}{{ 'ab' | center(4) }}{{ 'x'.ljust(3) }}."
    assert render_chat_template(template, [{"role": "user", "n": 10**12}]) == "1000000000000 2000000000000 ab x  ."


@pytest.mark.parametrize("family", ["llama3_1_tools", "qwen2", "mistral"])
def test_long_conversations_are_within_the_bounds(folders, family):
    """The bounds are far above what a real template needs: 2,000 turns with tools render as
    transformers renders them."""
    folder = folders["bytelevel", family]
    ours, hf = load_tokenizer(folder), oracle(folder)
    messages = [U1, A1] * 2000 + [U2]
    parameters = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 10**12}}}
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": parameters}} for i in range(50)]
    kwargs = dict(add_generation_prompt=True, tokenize=False, tools=tools)
    assert ours.apply_chat_template(messages, **kwargs) == hf.apply_chat_template(messages, **kwargs)


def test_stream_decoder_never_breaks_characters(backends, tmp_path):
    texts = ["naïve café 😀 — Ünïcödé 中文字符 and 🇩🇪 flags", "Hello world, you are the capital of France."]
    for kind, backend in backends.items():
        tok = load_tokenizer(write_folder(tmp_path / kind, backend, {"eos_token": "</s>"}, None))
        for text in texts:
            ids = tok.encode(text, add_special_tokens=False)
            stream = tok.stream_decoder()
            pieces = [stream.push(i) for i in ids] + [stream.flush()]
            assert all("\ufffd" not in p for p in pieces), (kind, pieces)
            assert "".join(pieces) == tok.decode(ids) == text
            assert sum(bool(p) for p in pieces) > 5  # it streams, not one piece at the end
        if kind == "sentencepiece":  # `▁` words keep their spaces mid-stream
            ids = tok.encode("Hello you are", add_special_tokens=False)
            stream = tok.stream_decoder()
            pieces = [p for p in (stream.push(i) for i in ids) if p]
            assert "".join(pieces) == "Hello you are" and any(p.startswith(" ") for p in pieces[1:])


def test_stream_decoder_skips_special_tokens():
    tok = load_tokenizer("eqxlm/default")
    ids = tok.encode("one<|endoftext|>two", add_special_tokens=False)
    assert 0 in ids
    stream = tok.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == "onetwo"


def test_bad_folders_are_named(tmp_path, backends):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        load_tokenizer(empty)
    folder = write_folder(tmp_path / "bad", backends["bytelevel"], {}, None)
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: not valid JSON"):
        load_tokenizer(folder)
    write_folder(folder, backends["bytelevel"], {"eos_token": "<|nope|>"}, None)
    with pytest.raises(TokenizerError, match=r"special token\(s\) \['<\|nope\|>'\] are not in the vocabulary"):
        load_tokenizer(folder)
    write_folder(folder, backends["bytelevel"], {"eos_token": 3}, None)
    with pytest.raises(TokenizerError, match="eos_token: expected a token string"):
        load_tokenizer(folder)
    tok = load_tokenizer(write_folder(tmp_path / "plain", backends["bytelevel"], {}, None))
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        tok.apply_chat_template([U1])


def test_default_model_tokenizer_config_is_the_training_scripts():
    """`scripts/train_default_model.py` writes the shipped tokenizer_config.json (a rebuild keeps it)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_default_model.py"
    spec = importlib.util.spec_from_file_location("train_default_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = (_default_folder() / "tokenizer_config.json").read_text()
    assert json.dumps(module.TOKENIZER_CONFIG, indent=2) + "\n" == shipped


def test_generation_block_tag_matches_transformers(folders):
    """`{% generation %}` (transformers' assistant-mask marker) renders its body."""
    folder = folders["bytelevel", "qwen2"]
    ours, hf = load_tokenizer(folder), oracle(folder)
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    for messages in CONVERSATIONS.values():
        got = ours.apply_chat_template(messages, chat_template=template, add_generation_prompt=True)
        assert got == hf_ids(hf, messages, chat_template=template, add_generation_prompt=True)
