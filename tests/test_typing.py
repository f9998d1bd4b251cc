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
    message = str(info.value)
    assert "parameter 'x'" in message and "hidden" in message


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "filter_jit"])
def test_inconsistent_named_dim_across_arguments(jit):
    rope = RotaryEmbedding(8, 10000.0)
    call = eqx.filter_jit(rope) if jit else rope
    with pytest.raises(TypeCheckError) as info:
        call(jnp.ones((5, 2, 8)), jnp.arange(4, dtype=jnp.int32))  # seq 5 vs 4
    message = str(info.value)
    assert "parameter 'positions'" in message and "seq=5" in message


def test_kv_heads_mismatch_between_key_and_value():
    q, k = jnp.ones((3, 4, 8)), jnp.ones((5, 2, 8))
    with pytest.raises(TypeCheckError) as info:
        dot_product_attention(q, k, jnp.ones((5, 1, 8)))
    assert "value" in str(info.value) and "kv_heads" in str(info.value)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "filter_jit"])
def test_float_token_ids_are_rejected(jit):
    model = _tiny()
    call = eqx.filter_jit(model) if jit else model
    with pytest.raises(TypeCheckError) as info:
        call(jnp.ones(4, jnp.float32))
    assert "input_ids" in str(info.value)


def test_batched_ids_tell_you_to_vmap():
    model = _tiny()
    with pytest.raises(TypeCheckError) as info:
        model(jnp.ones((2, 4), jnp.int32))
    assert "input_ids" in str(info.value) and "seq" in str(info.value)
    assert jax.vmap(model)(jnp.ones((2, 4), jnp.int32)).logits.shape == (2, 4, 32)


def test_switch_turns_checks_off():
    code = (
        "import jax.numpy as jnp; from eqxlm.nn import RotaryEmbedding; "
        "r = RotaryEmbedding(8, 10000.0); print(r(jnp.ones((5, 2, 8)), jnp.arange(5.0)).shape)"
    )
    env = {**os.environ, "EQXLM_TYPECHECK": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(5, 2, 8)" in out.stdout
