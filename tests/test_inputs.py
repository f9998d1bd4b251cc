"""What users pass in: short type errors, array-likes, lengths, padding, memory, the CLI.
Every error names the culprit (argument, row, field) and says how to fix the call."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf import tiny_mistral
from jaxtyping import TypeCheckError

import eqxlm
import eqxlm._memory
from eqxlm._inputs import as_mask, as_token_ids
from eqxlm._typing import ArgumentError
from eqxlm.cli import main


@pytest.fixture(scope="module")
def model():
    return tiny_mistral(max_position_embeddings=32)


def test_one_dimensional_ids_give_a_short_error_with_the_fix(model):
    with pytest.raises(TypeCheckError) as info:
        eqxlm.generate(model, jnp.arange(4, dtype=jnp.int32))
    message = str(info.value)
    assert message == (
        "eqxlm.generation.generate: parameter 'input_ids' expected Int[Array, 'batch seq'] | "
        "Int[np.ndarray, 'batch seq'] | list, got int32[4].\n"
        "For one sequence, pass a batch of one: `input_ids[None]`."
    )
    assert isinstance(info.value, ArgumentError) and "weight" not in message  # the model is never printed
    assert "Called with parameters" in info.value.report  # jaxtyping's full report is kept


def test_lists_and_numpy_are_accepted_like_arrays(model):
    ids = [[5, 6, 7, 8]]
    want = np.asarray(eqxlm.generate(model, jnp.asarray(ids, jnp.int32), max_new_tokens=4))
    np.testing.assert_array_equal(np.asarray(eqxlm.generate(model, ids, max_new_tokens=4)), want)
    np.testing.assert_array_equal(
        np.asarray(eqxlm.generate(model, np.array(ids, np.int64), [[1, 1, 1, 1]], max_new_tokens=4)), want
    )


@pytest.mark.parametrize(
    "ids,needles",
    [
        ([5, 6, 7], ["input_ids: expected 2 dims (batch seq), got a list of shape [3] (int64)", "`input_ids[None]`"]),
        ([[1.0, 2.0]], ["input_ids: token ids must be integers", "float64", "jnp.asarray(input_ids, jnp.int32)"]),
        ([[1, 2], [3]], ["input_ids: cannot make an array of list of 2", "left padding", "jnp.asarray"]),
        ([[True, False]], ["input_ids: token ids must be integers", "bool"]),
    ],
)
def test_bad_array_likes_name_the_argument_and_jnp_asarray(model, ids, needles):
    with pytest.raises(TypeError) as info:
        eqxlm.generate(model, ids)
    for needle in needles:
        assert needle in str(info.value)
    assert len(str(info.value).splitlines()) <= 3


def test_helpers_convert_once():
    assert as_token_ids([[1, 2]]).dtype == jnp.int32 and as_token_ids(np.array([3], np.int64), ndim=1).shape == (1,)
    assert as_mask([[1, 0]], (1, 2)).dtype == jnp.bool_
    with pytest.raises(ArgumentError, match=r"attention_mask: expected only 0 and 1, got values \[0, 2\]"):
        as_mask(np.array([[2, 0]]), (1, 2))
    with pytest.raises(ArgumentError, match=r"attention_mask: expected the shape of input_ids \[1, 3\], got numpy int64\[1,2\]"):
        as_mask(np.array([[1, 0]]), (1, 3))
    with pytest.raises(ArgumentError, match="This takes one sequence; for a batch, map it with `jax.vmap`"):
        as_token_ids([[1, 2]], ndim=1)


def test_prompt_longer_than_max_position_embeddings_is_refused(model):
    with pytest.raises(ValueError) as info:
        eqxlm.generate(model, np.ones((1, 40), np.int32), max_new_tokens=1)
    assert str(info.value) == (
        "longest prompt (40 tokens) + max_new_tokens (1) = 41 positions exceeds the model's max_position_embeddings (32)."
    )
    # Left padding does not count: positions count real tokens only.
    mask = np.zeros((1, 40), np.int32)
    mask[0, -8:] = 1
    assert eqxlm.generate(model, np.ones((1, 40), np.int32), mask, max_new_tokens=4).shape == (1, 44)


def test_right_padding_is_refused_naming_the_row(model):
    ids = np.array([[5, 6, 7, 8], [5, 6, 0, 0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.raises(ValueError) as info:
        eqxlm.generate(model, ids, mask)
    assert str(info.value).startswith("attention_mask: row 1 ends with padding (right-padded)")
    assert "padding_side='left'" in str(info.value)
    with pytest.raises(ValueError, match="row 0 has no real token"):
        eqxlm.generate(model, ids, np.zeros_like(mask))


def test_no_position_limit_warns_once_past_the_trained_length():
    raw = {"model_type": "bloom", "vocab_size": 32, "hidden_size": 16, "n_layer": 1, "n_head": 2, "seq_length": 8}
    bloom = eqxlm.DecoderLM(eqxlm.BloomConfig.from_hf(raw), key=jax.random.key(0))
    with pytest.warns(UserWarning, match=r"runs past the 8 the model was trained on \(bloom has no position limit"):
        eqxlm.generate(bloom, np.ones((1, 6), np.int32), max_new_tokens=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eqxlm.generate(bloom, np.ones((1, 7), np.int32), max_new_tokens=4)  # once only


def test_a_model_too_large_for_memory_fails_at_once(monkeypatch, tmp_path):
    monkeypatch.setattr(eqxlm._memory, "available_memory", lambda device=None: (2**30, "MemAvailable in /proc/meminfo"))
    with pytest.raises(MemoryError) as info:
        eqxlm.DecoderLM(eqxlm.MistralConfig(), key=jax.random.key(0))  # the 7B shape
    assert str(info.value) == (
        "DecoderLM(MistralConfig(...)): its weights need 26.98 GiB, but only 1.00 GiB is available "
        "(MemAvailable in /proc/meminfo). Use a smaller config, a 16-bit dtype, or a mesh of devices with more memory."
    )
    eqxlm.save_pretrained(tiny_mistral(), tmp_path)
    monkeypatch.setattr(eqxlm._memory, "available_memory", lambda device=None: (1000, "MemAvailable in /proc/meminfo"))
    monkeypatch.setattr(eqxlm._safetensors.SafetensorsFile, "read", lambda *a, **k: pytest.fail("read before the check"))
    with pytest.raises(MemoryError, match=rf"{tmp_path} as float32: its weights need 0\.00 GiB, but only 0\.00 GiB"):
        eqxlm.from_pretrained(tmp_path)


def test_the_real_memory_figure_is_read():
    available, source = eqxlm._memory.available_memory()
    assert available > 0 and source


# -- the command line -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from test_cli import make_cli_checkpoint

    return make_cli_checkpoint(tmp_path_factory.mktemp("cli"))


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"eqxlm {eqxlm.__version__}"


@pytest.mark.parametrize(
    "args,message",
    [
        (["-t", "-1"], "eqxlm: error: --temperature must be >= 0 (0 = greedy), got -1.0."),
        (["-n", "0"], "eqxlm: error: --max-new-tokens must be >= 1, got 0."),
        (["--top-p", "1.5"], "eqxlm: error: --top-p must be in (0, 1], got 1.5."),
        (["--top-k", "-2"], "eqxlm: error: --top-k must be >= 0 (0 = off), got -2."),
        (["-n", "300"], "exceeds the model's max_position_embeddings (256)."),
    ],
)
def test_cli_validates_everything_before_echoing_the_prompt(folder, args, message, capsys):
    assert main(["generate", str(folder), "--prompt", "the return", *args]) == 2
    out = capsys.readouterr()
    assert out.out == ""  # nothing printed before the error
    assert message in out.err and len(out.err.splitlines()) == 1


def test_cli_no_bos_message_is_true(folder, capsys):
    assert main(["generate", str(folder), "--prompt", "", "--no-bos"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert "--no-bos leaves nothing to start from (without --no-bos it starts from BOS, id 0)" in out.err
    config = json.loads((folder / "config.json").read_text())
    assert config["bos_token_id"] == 0
