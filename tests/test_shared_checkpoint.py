"""The real trained checkpoint in ../shared/models (Karpathy's stories260K, Llama and
Mistral forms) reproduces its README's reference greedy continuation token for token."""

import re

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shared_model

import eqxlm


def _reference(n: int) -> list[int]:
    readme = (shared_model("stories260K") / "README.md").read_text()
    block = readme.split("256 new tokens:")[1].split("```")[1]
    ids = [int(x) for x in re.findall(r"\d+", block)]
    assert len(ids) == 256
    return ids[:n]


@pytest.mark.parametrize("name,cls", [("stories260K", eqxlm.LlamaConfig), ("stories260K-mistral", eqxlm.MistralConfig)])
def test_generate_reproduces_256_reference_tokens(name, cls):
    model = eqxlm.from_pretrained(shared_model(name))
    assert type(model.config) is cls and model.config.tie_word_embeddings and model.lm_head is None
    out = np.asarray(eqxlm.generate(model, np.array([[1]]), max_new_tokens=256, eos_token_id=[]))
    np.testing.assert_array_equal(out[0, 1:], _reference(256))


@pytest.mark.parametrize("name", ["stories260K", "stories260K-mistral"])
def test_argmax_loop_over_full_forwards(name):
    """No cache at all: 48 steps of argmax over a full forward agree with the reference."""
    model = eqxlm.from_pretrained(shared_model(name))
    forward = eqx.filter_jit(lambda m, i, mask: m(i, mask).logits)  # right-padded to one shape
    ids = [1]
    for _ in range(48):
        padded = jnp.asarray(ids + [0] * (64 - len(ids)), jnp.int32)
        mask = jnp.asarray([1] * len(ids) + [0] * (64 - len(ids)), jnp.int32)
        ids.append(int(jnp.argmax(forward(model, padded, mask)[len(ids) - 1])))
    assert ids[1:] == _reference(48)
