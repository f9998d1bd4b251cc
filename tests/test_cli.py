"""The `eqxlm` command line, end to end, on a checkpoint with a tokenizer the test builds."""

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
