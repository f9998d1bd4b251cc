"""The `eqxlm` command line, end to end, on a checkpoint with a tokenizer the test builds."""

import io
import json
import subprocess
import sys

import pytest
from hf import hf_model, save_hf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from eqxlm.cli import build_parser, main

TEXT = ["the return statement leaves a function", "a list is a mutable sequence", "the quick brown fox"] * 20


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_cli_checkpoint(tmp_path_factory.mktemp("cli"))


def make_cli_checkpoint(path):
    """A tiny Mistral with a BPE tokenizer trained on `TEXT` (BOS = EOS = id 0)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        TEXT,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    vocab = tok.get_vocab_size()
    save_hf(hf_model("mistral", vocab_size=vocab, sliding_window=8, bos_token_id=0, eos_token_id=0), path)
    tok.save(str(path / "tokenizer.json"))
    return path


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "eqxlm.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_generate_streams_text_and_a_summary(folder):
    out = _run("generate", str(folder), "--prompt", "the return", "--max-new-tokens", "12", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("the return") and len(out.stdout.strip()) > len("the return")
    summary = out.stderr.strip().splitlines()[-1]
    assert "new tokens" in summary and "tokens/s" in summary and "compile" in summary


def test_sampling_is_reproducible_for_a_seed(folder, capsys):
    args = ["generate", str(folder), "-p", "a list", "-n", "10", "--temperature", "1.0", "--top-p", "0.9", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_help_is_complete():
    parser = build_parser()
    text = parser.format_help()
    assert "generate" in text and "info" in text
    sub = _run("generate", "--help")
    for flag in ("--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--min-p", "--repetition-penalty"):
        assert flag in sub.stdout
    assert "--seed" in sub.stdout and "--dtype" in sub.stdout


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize(
    "args,message",
    [
        (["--min-p", "1.5"], "--min-p must be in [0, 1], got 1.5."),
        (["--repetition-penalty", "0"], "--repetition-penalty must be a number > 0 (1.0 = off), got 0.0."),
        (["--repetition-penalty", "nan"], "--repetition-penalty must be a number > 0 (1.0 = off), got nan."),
        (["-t", "-1"], "--temperature must be >= 0 (0 = greedy), got -1.0."),
        (["--top-k", "-2"], "--top-k must be >= 0 (0 = off), got -2."),
        (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0."),
    ],
)
def test_sampling_options_are_checked_by_sampling_config_naming_the_option(folder, command, args, message, capsys):
    """`generate` and `chat` build one `SamplingConfig` from their options, before loading
    anything; its refusal comes back under the option's name."""
    prompt = ["--prompt", "x"] if command == "generate" else []
    assert main([command, str(folder), *prompt, *args]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == f"eqxlm: error: {message}\n"


def test_sampling_options_reach_the_sampling_config():
    from eqxlm import SamplingConfig
    from eqxlm.cli import _sampling_config

    parser = build_parser()
    args = parser.parse_args(["chat", "-t", "0.8", "--top-k", "5", "--min-p", "0.1", "--repetition-penalty", "1.2"])
    assert _sampling_config(args) == SamplingConfig(do_sample=True, temperature=0.8, top_k=5, min_p=0.1, repetition_penalty=1.2)
    args = parser.parse_args(["generate", "-p", "x", "-t", "0", "--repetition-penalty", "1.2"])
    assert _sampling_config(args) == SamplingConfig(top_k=40, repetition_penalty=1.2)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["generate", "/no/such/folder", "--prompt", "x"], "not a checkpoint folder"),
        (["generate", "--prompt", "x", "--max-new-tokens", "many"], "invalid int value"),
    ],
)
def test_errors_are_one_readable_line(args, needle):
    out = _run(*args)
    assert out.returncode == 2
    assert needle in out.stderr and "Traceback" not in out.stderr


def test_folder_without_tokenizer(folder, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    out = _run("generate", str(tmp_path), "--prompt", "x")
    assert out.returncode == 2 and "tokenizer.json" in out.stderr and "Traceback" not in out.stderr


def test_info(folder, capsys):
    assert main(["info", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "MistralForCausalLM" in text and "parameters" in text and json.dumps(8) in text


def test_chat_banner_names_the_architecture(folder, tmp_path, capsys, monkeypatch):
    """The banner shows the family's architecture (as the README does), not the builder's class."""
    chat_folder = tmp_path / "chat"
    chat_folder.mkdir()
    for path in folder.iterdir():
        (chat_folder / path.name).symlink_to(path)
    template = "{% for m in messages %}{{ m['content'] }}<eos>{% endfor %}"
    (chat_folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "chat_template": template}))
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # Ctrl-D at the first prompt
    assert main(["chat", str(chat_folder), "--max-length", "64", "--max-new-tokens", "4"]) == 0
    banner = capsys.readouterr().err
    assert f"eqxlm chat: {chat_folder} (MistralForCausalLM, up to 64 tokens)." in banner, banner


def test_model_repr_names_the_architecture(folder):
    """`repr` heads equinox's tree (shapes, never values) with the architecture; a model with no
    family falls back to its class name."""
    from types import SimpleNamespace

    import eqxlm
    from eqxlm.models._contract import architecture_name

    text = repr(eqxlm.from_pretrained(folder))
    assert text.startswith("MistralForCausalLM: DecoderLM(\n") and "f32[" in text and "Array(" not in text
    assert architecture_name(SimpleNamespace(config=None)) == "SimpleNamespace"
# -- numeric options: `--x -1e-3` reads as `--x=-1e-3` -------------------------------------------------------
REQUIRED = {"generate": ["--prompt", "x"], "chat": [], "eval": ["m", "--tasks", "t"], "info": [],
            "train": ["--data", "d.txt", "--output-dir", "out"]}  # fmt: skip
NEGATIVE_ALLOWED = {"seed"}


def _numeric_options():
    """(command, action) for every int or float option of every sub-command."""
    import argparse

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    return [(name, action) for name, sub in commands.items() for action in sub._actions if action.type in (int, float)]


def test_every_numeric_option_reads_a_negative_number_with_or_without_equals():
    options = _numeric_options()
    assert {name for name, _ in options} == {"generate", "chat", "eval", "train"}
    parser = build_parser()
    for command, action in options:
        values = ["-3"] if action.type is int else ["-3", "-1e-3", "-.5", "-2E+1", "-inf"]
        for flag in action.option_strings:
            for value in values:
                spaced = parser.parse_args([command, *REQUIRED[command], flag, value])
                joined = parser.parse_args([command, *REQUIRED[command], f"{flag}={value}"])
                assert spaced == joined and getattr(spaced, action.dest) == action.type(value), (command, flag, value)


def test_every_numeric_option_refuses_a_negative_value_by_name():
    import dataclasses

    from eqxlm.cli import _check_numbers
    from eqxlm.train import TrainConfig

    parser = build_parser()
    for command, action in _numeric_options():
        args = parser.parse_args([command, *REQUIRED[command], action.option_strings[0], "-1"])
        if command == "train":
            values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
            try:
                TrainConfig(**values).check()
                problem = None
            except ValueError as e:
                problem = str(e)
            named = f"TrainConfig.{action.dest} "
        else:
            problem, named = _check_numbers(args), f"--{action.dest.replace('_', '-')} "
        if action.dest in NEGATIVE_ALLOWED:
            assert problem is None, (command, problem)
        else:
            assert problem is not None and named in problem and "got -1" in problem, (command, action.dest, problem)


def test_negative_learning_rate_gets_the_one_line_error(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--data", str(tmp_path / "d.txt"), "--output-dir", str(out), "--learning-rate", "-1e-3"]) == 2
    err = capsys.readouterr().err
    assert err == "eqxlm: error: --learning-rate must be positive, got -0.001.\n"
    assert not out.exists()
