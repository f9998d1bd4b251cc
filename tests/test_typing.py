"""Wrong shapes and dtypes fail with messages that name the argument and the dims,
eagerly and at trace time under `eqx.filter_jit`."""

import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from jaxtyping import TypeCheckError

import eqxlm
from eqxlm.nn import RMSNorm, RotaryEmbedding, dot_product_attention


def _tiny():
    config = eqxlm.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    return eqxlm.DecoderLM(config, key=jax.random.key(0))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "filter_jit"])
def test_wrong_rank_names_argument(jit):
    norm = RMSNorm(8)
    call = eqx.filter_jit(norm) if jit else norm
    with pytest.raises(TypeCheckError) as info:
        call(jnp.ones((3, 8)))
    assert str(info.value) == (
        "eqxlm.nn._norm.RMSNorm.__call__: parameter 'x' expected Float[Array, 'hidden'], got float32[3,8].\n"
        "This takes one example; for a batch, map it with `jax.vmap`."
    )


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "filter_jit"])
def test_inconsistent_named_dim_across_arguments(jit):
    rope = RotaryEmbedding(8, 10000.0)
    call = eqx.filter_jit(rope) if jit else rope
    with pytest.raises(TypeCheckError) as info:
        call(jnp.ones((5, 2, 8)), jnp.arange(4, dtype=jnp.int32))  # seq 5 vs 4
    assert str(info.value) == (
        "eqxlm.nn._rotary.RotaryEmbedding.__call__: parameter 'positions' expected Int[Array, 'seq'], got int32[4].\n"
        "Dims bound: seq=5, heads=2, head_dim=8.\n"
        "The rank and dtype are right: a dim disagrees with the dims bound above."
    )


def test_kv_heads_mismatch_between_key_and_value():
    q, k = jnp.ones((3, 4, 8)), jnp.ones((5, 2, 8))
    with pytest.raises(TypeCheckError) as info:
        dot_product_attention(q, k, jnp.ones((5, 1, 8)))
    assert str(info.value).splitlines()[:2] == [
        "eqxlm.nn._attention.dot_product_attention: parameter 'value' expected Float[Array, 'kv_seq kv_heads head_dim'], "
        "got float32[5,1,8].",
        "Dims bound: seq=3, heads=4, head_dim=8, kv_seq=5, kv_heads=2.",
    ]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "filter_jit"])
def test_float_token_ids_are_rejected(jit):
    model = _tiny()
    call = eqx.filter_jit(model) if jit else model
    with pytest.raises(TypeCheckError) as info:
        call(jnp.ones(4, jnp.float32))
    assert str(info.value) == (
        "eqxlm.models.llama.LlamaForCausalLM.__call__: parameter 'input_ids' expected Int[Array, 'seq'], got float32[4].\n"
        "The dtype is wrong: expected Int, got float32. Token ids are integers: `jnp.asarray(input_ids, jnp.int32)`."
    )


def test_batched_ids_tell_you_to_vmap():
    model = _tiny()
    with pytest.raises(TypeCheckError) as info:
        model(jnp.ones((2, 4), jnp.int32))
    assert str(info.value) == (
        "eqxlm.models.llama.LlamaForCausalLM.__call__: parameter 'input_ids' expected Int[Array, 'seq'], got int32[2,4].\n"
        "This takes one example; for a batch, map it with `jax.vmap`."
    )
    assert jax.vmap(model)(jnp.ones((2, 4), jnp.int32)).logits.shape == (2, 4, 32)


def test_a_model_is_never_printed():
    """A wrong pytree argument is summarised by its type, not its repr."""
    model = _tiny()
    with pytest.raises(TypeCheckError) as info:
        eqxlm.generate(model.model, jnp.ones((1, 4), jnp.int32))
    assert str(info.value) == (
        "eqxlm.generation.generate: parameter 'model' expected BloomForCausalLM | LlamaForCausalLM | MistralForCausalLM, "
        "got LlamaModel."
    )


def test_switch_turns_checks_off():
    code = (
        "import jax.numpy as jnp; from eqxlm.nn import RotaryEmbedding; "
        "r = RotaryEmbedding(8, 10000.0); print(r(jnp.ones((5, 2, 8)), jnp.arange(5.0)).shape)"
    )
    env = {**os.environ, "EQXLM_TYPECHECK": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(5, 2, 8)" in out.stdout
