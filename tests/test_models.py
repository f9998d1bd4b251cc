"""Model logits against transformers (PyTorch) on tiny random checkpoints, float32 within 1e-4."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LOGITS_ATOL
from hf import hf_model, run_hf, save_hf, tiny_mistral

import eqxlm

LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CASES = {
    "bloom-4heads": ("bloom", {}),
    "bloom-6heads": ("bloom", {"hidden_size": 48, "n_head": 6}),
    "bloom-12heads-postln": ("bloom", {"hidden_size": 48, "n_head": 12, "apply_residual_connection_post_layernorm": True}),
    "bloom-4heads-postln-untied": ("bloom", {"apply_residual_connection_post_layernorm": True, "tie_word_embeddings": False}),
    "mistral-mha": ("mistral", {"num_key_value_heads": 4}),
    "mistral-gqa-window3": ("mistral", {"sliding_window": 3}),
    "mistral-mqa-window4": ("mistral", {"num_key_value_heads": 1, "sliding_window": 4}),
    "mistral-theta1e6-headdim16": ("mistral", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "head_dim": 16}),
    "llama-gqa": ("llama", {}),
    "llama-bias-tied": ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    "llama-rope-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
    "llama-rope-llama3": ("llama", {"rope_parameters": LLAMA3}),
}


# Jitted calls with shared shapes (eager op-by-op dispatch of a model is several times slower).
forward = eqx.filter_jit(lambda m, ids, mask: jax.vmap(m)(ids, mask).logits)
inside = eqx.filter_jit(lambda m, ids: m(ids, output_hidden_states=True, output_attentions=True))
base_hidden = eqx.filter_jit(lambda m, ids: m.base_model(ids).last_hidden_state)


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    kind, overrides = CASES[request.param]
    ref = hf_model(kind, **overrides)
    path = save_hf(ref, tmp_path_factory.mktemp(request.param))
    return request.param, ref, eqxlm.from_pretrained(path)


def test_logits_match(pair):
    name, ref, ours = pair
    ids = np.random.default_rng(0).integers(0, 96, size=(3, 12))
    want = run_hf(ref, ids).logits.numpy()
    got = np.asarray(forward(ours, jnp.asarray(ids, jnp.int32), jnp.ones(ids.shape, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=LOGITS_ATOL, rtol=0)
    assert np.abs(want).max() > 1.0  # logits large enough for the tolerance to mean something


def test_left_padded_batch_matches_hf_with_position_ids(pair):
    """A ragged batch through `jax.vmap`: at real tokens, eqxlm's logits equal transformers'
    given explicit position ids, and equal the unpadded sequence's."""
    name, ref, ours = pair
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 96, size=(3, 12))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0) * mask
    kwargs = {} if name.startswith("bloom") else {"position_ids": positions}
    want = run_hf(ref, ids, mask, **kwargs).logits.numpy()
    got = np.asarray(forward(ours, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=LOGITS_ATOL, rtol=0)
    # the last row's 3 real tokens alone, at the start of a row (padding after them is never seen)
    alone = np.zeros_like(ids)
    alone[:, :3] = ids[2, 9:]
    unpadded = np.asarray(forward(ours, jnp.asarray(alone, jnp.int32), jnp.asarray(np.ones_like(ids))))[0, :3]
    np.testing.assert_allclose(got[2, 9:], unpadded, atol=LOGITS_ATOL, rtol=0)


def test_hidden_states_and_attentions_match(pair):
    name, ref, ours = pair
    ids = np.random.default_rng(2).integers(0, 96, size=(1, 9))
    want = run_hf(ref, ids, output_hidden_states=True, output_attentions=True)
    got = inside(ours, jnp.asarray(ids[0], jnp.int32))
    assert len(got.hidden_states) == len(want.hidden_states)
    for g, w in zip(got.hidden_states, want.hidden_states, strict=True):
        np.testing.assert_allclose(np.asarray(g), w[0].numpy(), atol=LOGITS_ATOL, rtol=0)
    if want.attentions:  # transformers 5 records attentions for eager attention
        for g, w in zip(got.attentions, want.attentions, strict=True):
            np.testing.assert_allclose(np.asarray(g), w[0].numpy(), atol=1e-5, rtol=0)
    plain = eqx.filter_eval_shape(ours, jnp.asarray(ids[0], jnp.int32))
    assert plain.hidden_states is None and plain.attentions is None


def test_base_model_returns_final_hidden_states(pair):
    name, ref, ours = pair
    ids = np.random.default_rng(3).integers(0, 96, size=(1, 6))
    base_ref = ref.transformer if name.startswith("bloom") else ref.model
    want = run_hf(base_ref, ids).last_hidden_state[0].numpy()
    got = base_hidden(ours, jnp.asarray(ids[0], jnp.int32))
    assert isinstance(ours.base_model, eqxlm.models.Decoder)
    np.testing.assert_allclose(np.asarray(got), want, atol=LOGITS_ATOL, rtol=0)


def test_random_init_from_config_and_types():
    model = tiny_mistral()
    assert isinstance(model, eqxlm.DecoderLM) and isinstance(model, eqxlm.AbstractCausalLM)
    assert isinstance(model.config, eqxlm.MistralConfig) and model.model.layers[0].self_attn.sliding_window == 8
    assert eqx.filter_eval_shape(model, jnp.arange(5, dtype=jnp.int32)).logits.shape == (5, 64)
    std = float(jnp.std(model.model.layers[0].self_attn.q_proj.weight))
    assert 0.015 < std < 0.025  # HF's N(0, initializer_range) initialisation


def test_token_id_out_of_range_is_an_error():
    config = eqxlm.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    model = eqxlm.DecoderLM(config, key=jax.random.key(0))
    with pytest.raises(Exception, match="token id out of range"):
        model(jnp.array([1, 16], jnp.int32))


def test_model_surgery_with_tree_at():
    """Parts recombine: swap rotary for ALiBi in a Mistral layer with eqx.tree_at."""
    config = eqxlm.MistralConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=None,
    )
    model = eqxlm.DecoderLM(config, key=jax.random.key(0))
    attn = model.model.layers[0].self_attn
    swapped = eqx.tree_at(lambda m: m.model.layers[0].self_attn.position_scheme, model, eqxlm.nn.ALiBi(2))
    assert isinstance(swapped.model.layers[0].self_attn.position_scheme, eqxlm.nn.ALiBi)
    assert isinstance(attn.position_scheme, eqxlm.nn.RotaryEmbedding)
    logits = eqx.filter_jit(lambda m, ids: m(ids).logits)
    out = logits(swapped, jnp.arange(6, dtype=jnp.int32))
    assert out.shape == (6, 32) and not np.allclose(np.asarray(out), np.asarray(logits(model, jnp.arange(6, dtype=jnp.int32))))
