"""KV-cached generation: cache equivalence, greedy parity with transformers, sampling."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import LOGITS_ATOL
from hf import hf_model, save_hf, tiny_mistral
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import eqxlm
from eqxlm.generation import bucket_length, process_logits

CASES = {
    "llama": ("llama", {}),
    "mistral-window4": ("mistral", {"sliding_window": 4}),
    "bloom-6heads": ("bloom", {"hidden_size": 48, "n_head": 6}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    kind, overrides = CASES[request.param]
    ref = hf_model(kind, seed=1, **overrides)
    return request.param, ref, eqxlm.from_pretrained(save_hf(ref, tmp_path_factory.mktemp(request.param)))


def _ragged(rng, batch=3, seq=10, pads=(0, 3, 6)):
    ids = rng.integers(3, 96, size=(batch, seq))
    mask = np.ones_like(ids)
    for row, p in enumerate(pads[:batch]):
        mask[row, :p] = 0
        ids[row, :p] = 0
    return ids, mask


def test_prefill_then_decode_steps_equal_one_full_forward(pair):
    """Prefill 6 tokens, decode 8 more one at a time: the logits at every real token equal
    one forward over all 14 (float32, 1e-4), for a ragged left-padded batch; Mistral's
    window (4) is far shorter than the sequence and its cache is a rolling buffer."""
    name, _, model = pair
    ids, mask = _ragged(np.random.default_rng(0), seq=14)
    ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    full = eqx.filter_jit(lambda m, i, k: jax.vmap(m)(i, k).logits)(model, ids, mask)
    cache = jax.vmap(lambda _: model.init_cache(14))(jnp.arange(3))
    if name.startswith("mistral"):
        assert cache.tables[0].rolling and cache.layers[0].keys.shape[1] == 4
    step = eqx.filter_jit(lambda m, i, k, c: jax.vmap(lambda i, k, c: m(i, k, cache=c))(i, k, c))
    out = step(model, ids[:, :6], mask[:, :6], cache)
    pieces, cache = [out.logits], out.cache
    for t in range(6, 14):
        out = step(model, ids[:, t : t + 1], mask[:, t : t + 1], cache)
        pieces.append(out.logits)
        cache = out.cache
    cached = np.asarray(jnp.concatenate(pieces, axis=1))
    real = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(cached[real], np.asarray(full)[real], atol=LOGITS_ATOL, rtol=0)


def _hf_generate(ref, ids, mask, new, **kw):
    with torch.no_grad():
        return ref.generate(
            torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new, do_sample=False, **kw
        ).numpy()


def test_greedy_matches_transformers_single_prompt(pair):
    name, ref, model = pair
    ids = np.random.default_rng(1).integers(3, 96, size=(1, 7))
    want = _hf_generate(ref, ids, np.ones_like(ids), 24, eos_token_id=[], pad_token_id=0)
    got = np.asarray(eqxlm.generate(model, ids, max_new_tokens=24, eos_token_id=[]))
    np.testing.assert_array_equal(got, want)


def test_greedy_matches_transformers_ragged_batch_crossing_the_window(pair):
    name, ref, model = pair
    ids, mask = _ragged(np.random.default_rng(2))
    want = _hf_generate(ref, ids, mask, 30, eos_token_id=[], pad_token_id=0)
    got = np.asarray(eqxlm.generate(model, ids, mask, max_new_tokens=30, eos_token_id=[]))
    np.testing.assert_array_equal(got, want)


def test_eos_stops_rows_and_pads_like_transformers(pair):
    name, ref, model = pair
    ids, mask = _ragged(np.random.default_rng(3))
    free = np.asarray(eqxlm.generate(model, ids, mask, max_new_tokens=12, eos_token_id=[]))
    eos = int(free[0, 10 + 3])  # a token row 0 emits at its 4th step
    want = _hf_generate(ref, ids, mask, 12, eos_token_id=eos, pad_token_id=0)
    got = np.asarray(eqxlm.generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0))
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)  # HF stops early: shorter output
    assert (got[:, want.shape[1] :] == 0).all()
    assert (got[0, 10 + 4 :] == 0).all()


def test_streamer_sees_every_new_token(pair):
    _, _, model = pair
    seen = []
    out = eqxlm.generate(model, np.array([[5, 6, 7]]), max_new_tokens=9, eos_token_id=[], streamer=seen.append)
    np.testing.assert_array_equal(np.stack(seen)[:, 0], np.asarray(out)[0, 3:])


# -- sampling ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    return tiny_mistral(max_position_embeddings=64, initializer_range=0.3)


def test_top_k_one_equals_greedy(small):
    ids = np.array([[1, 2, 3, 4]])
    greedy = eqxlm.generate(small, ids, max_new_tokens=20, eos_token_id=[])
    sampled = eqxlm.generate(
        small, ids, max_new_tokens=20, eos_token_id=[], do_sample=True, top_k=1, temperature=0.7, key=jax.random.key(5)
    )
    np.testing.assert_array_equal(np.asarray(sampled), np.asarray(greedy))


def test_same_key_same_tokens_new_key_new_tokens(small):
    ids = np.array([[1, 2, 3, 4], [9, 8, 7, 6]])
    kw = dict(max_new_tokens=24, eos_token_id=[], do_sample=True, temperature=1.5)
    a = eqxlm.generate(small, ids, key=jax.random.key(1), **kw)
    b = eqxlm.generate(small, ids, key=jax.random.key(1), **kw)
    c = eqxlm.generate(small, ids, key=jax.random.key(2), **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.3), (None, 0.9), (10, 0.5)])
def test_warpers_match_transformers_allowed_sets(top_k, top_p):
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.normal(size=64).astype(np.float32) * 3
        want = torch.tensor(logits)[None] / 0.8
        if top_k:
            want = TopKLogitsWarper(top_k)(None, want)
        if top_p:
            want = TopPLogitsWarper(top_p)(None, want)
        got = process_logits(jnp.asarray(logits), 0.8, top_k or 0, top_p or 1.0)
        np.testing.assert_array_equal(np.isfinite(np.asarray(got)), torch.isfinite(want[0]).numpy())
        finite = np.isfinite(np.asarray(got))
        np.testing.assert_allclose(np.asarray(got)[finite], want[0].numpy()[finite], rtol=1e-6)


def test_samples_stay_in_the_allowed_set_and_follow_the_distribution():
    """The allowed set and the probabilities come from transformers' warpers and torch's
    softmax (the oracle); the draws from eqxlm's sampling path (`_select`)."""
    from eqxlm.generation import _select

    raw = np.random.default_rng(1).normal(size=32).astype(np.float32) * 2
    warped = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(6)(None, torch.tensor(raw)[None] / 1.5))[0]
    allowed = torch.isfinite(warped).numpy()
    probs = torch.softmax(warped, -1).numpy()
    assert allowed.sum() == 4  # top-k keeps 6, top-p then 4
    logits = jnp.broadcast_to(jnp.asarray(raw), (20000, 32))
    draws = np.asarray(_select(logits, jax.random.key(0), True, 1.5, 6, 0.8))
    assert allowed[draws].all()
    freq = np.bincount(draws, minlength=32) / len(draws)
    assert np.abs(freq - probs).max() < 0.02


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(do_sample=True, temperature=0.0, key=jax.random.key(0)), "temperature"),
        (dict(do_sample=True, top_p=0.0, key=jax.random.key(0)), "top_p"),
        (dict(do_sample=True, top_k=0, key=jax.random.key(0)), "top_k"),
        (dict(do_sample=True), "key"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=61), "max_position_embeddings"),
    ],
)
def test_invalid_settings_raise_before_compiling(small, kwargs, match):
    with pytest.raises(ValueError, match=match):
        eqxlm.generate(small, np.array([[1, 2, 3, 4]]), **{"max_new_tokens": 8, **kwargs})


def test_no_recompile_for_new_prompt_temperature_or_key_in_a_bucket(small):
    compiles = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    kw = dict(max_new_tokens=10, eos_token_id=[], do_sample=True, top_k=8)
    eqxlm.generate(small, np.array([[1, 2, 3]]), temperature=0.9, key=jax.random.key(0), **kw)
    compiles.clear()
    eqxlm.generate(
        small, np.array([[4, 5, 6, 7, 8]]), temperature=1.3, key=jax.random.key(9), top_p=0.7, **{**kw, "max_new_tokens": 12}
    )
    assert bucket_length(3) == bucket_length(5)
    assert not [c for c in compiles], f"recompiled {len(compiles)} time(s)"
