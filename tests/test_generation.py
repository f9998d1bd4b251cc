"""KV-cached generation: cache equivalence, greedy parity with transformers, sampling."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import LOGITS_ATOL
from hf import hf_model, save_hf, tiny_mistral
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import eqxlm
from eqxlm import SamplingConfig
from eqxlm.generation import SamplingConfigError, bucket_length, present, process_logits

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
    sampling = SamplingConfig(do_sample=True, top_k=1, temperature=0.7)
    sampled = eqxlm.generate(small, ids, max_new_tokens=20, eos_token_id=[], sampling=sampling, key=jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(sampled), np.asarray(greedy))


def test_same_key_same_tokens_new_key_new_tokens(small):
    ids = np.array([[1, 2, 3, 4], [9, 8, 7, 6]])
    sampling = SamplingConfig(do_sample=True, temperature=1.5, min_p=0.02, repetition_penalty=1.2)
    kw = dict(max_new_tokens=24, eos_token_id=[], sampling=sampling)
    a = eqxlm.generate(small, ids, key=jax.random.key(1), **kw)
    b = eqxlm.generate(small, ids, key=jax.random.key(1), **kw)
    c = eqxlm.generate(small, ids, key=jax.random.key(2), **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def _logit_rows(vocab=64, rows=24):
    """Random logits, with rows of ties (values on a coarse grid), a row with a token whose
    probability rounds to 0 (an unset top-p must keep it) and a row where one token dwarfs the
    rest (min-p 0.1 keeps only it)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(rows, vocab)).astype(np.float32) * 3
    logits[: rows // 3] = np.round(logits[: rows // 3])  # many exact ties, at the top too
    logits[-2, 7] = -200.0
    logits[-1, 5] = 40.0
    return logits


def _ours(logits, sampling, seen=None):
    values = sampling.values()
    if seen is None:
        return np.asarray(jax.vmap(process_logits, in_axes=(0, None))(jnp.asarray(logits), values))
    return np.asarray(jax.vmap(process_logits, in_axes=(0, None, 0))(jnp.asarray(logits), values, jnp.asarray(seen)))


def _assert_same_logits(got, want, tied_rows_of=None):
    """Same tokens removed, and the kept logits equal. `tied_rows_of` (the input logits): top-p
    cuts by rank, and which of several equal logits at the cut goes follows the sort's order
    among equal values (torch's is unspecified, eqxlm's by index), so a row with ties keeps the
    same values, not necessarily the same ids."""
    if tied_rows_of is not None:
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.sort(g[np.isfinite(g)]), np.sort(w[np.isfinite(w)]), rtol=1e-6, atol=0)
        untied = np.array([len(np.unique(row)) == len(row) for row in tied_rows_of])
        assert untied.sum() >= len(untied) // 2
        got, want = got[untied], want[untied]
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "sampling,warper",
    [
        (SamplingConfig(do_sample=True, temperature=0.7), TemperatureLogitsWarper(0.7)),
        (SamplingConfig(do_sample=True, top_k=5), TopKLogitsWarper(5)),
        (SamplingConfig(do_sample=True, top_p=0.3), TopPLogitsWarper(0.3)),
        (SamplingConfig(do_sample=True, top_p=0.9), TopPLogitsWarper(0.9)),
        (SamplingConfig(do_sample=True, min_p=0.1), MinPLogitsWarper(0.1)),
        (SamplingConfig(do_sample=True, min_p=0.5), MinPLogitsWarper(0.5)),
    ],
    ids=["temperature", "top_k", "top_p_0.3", "top_p_0.9", "min_p_0.1", "min_p_0.5"],
)
def test_warpers_each_equal_transformers(sampling, warper):
    logits = _logit_rows()
    want = warper(None, torch.tensor(logits)).numpy()
    got = _ours(logits, sampling)
    _assert_same_logits(got, want, tied_rows_of=logits if sampling.top_p is not None else None)
    if sampling.min_p == 0.1:
        assert np.isfinite(want[-1]).sum() == 1  # the row where min-p keeps one token


@pytest.mark.parametrize("penalty", [1.3, 0.6])
def test_repetition_penalty_equals_transformers_ignoring_left_padding(penalty):
    """Positive and negative logits of the ids present, left padding excluded as transformers'
    `generate` excludes it (`prompt_ignore_length` = each row's leading padding). The pad id
    occurs nowhere else in the rows, so counting it would change its logit."""
    logits = _logit_rows(rows=6)
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 40, size=(6, 12))
    ids[:, 3] = ids[:, 4]  # repeated ids are penalised once
    mask = np.ones_like(ids)
    for row, pads in enumerate([0, 2, 5, 0, 11, 1]):
        ids[row, :pads], mask[row, :pads] = 0, 0
    ignore = torch.tensor(mask).int().argmax(dim=1)  # as `_get_logits_processor` computes it
    want = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=ignore)(torch.tensor(ids), torch.tensor(logits))
    seen = jax.vmap(lambda i, m: present(i, m, 64))(jnp.asarray(ids), jnp.asarray(mask, bool))
    for sampling in (SamplingConfig(repetition_penalty=penalty), SamplingConfig(do_sample=True, repetition_penalty=penalty)):
        _assert_same_logits(_ours(logits, sampling, seen), want.numpy())
    assert (logits[np.asarray(seen)] < 0).any() and (logits[np.asarray(seen)] > 0).any()
    assert not np.asarray(seen)[:, 0].any()


@pytest.mark.parametrize("do_sample", [True, False])
def test_processor_chain_equals_transformers_generate(do_sample):
    """Everything set at once: the processors transformers' `generate` builds for the same
    `GenerationConfig` (its `_get_logits_processor`, left-padded attention mask included), in
    its order, against `process_logits`."""
    ref = hf_model("llama", seed=1)
    fields = dict(do_sample=do_sample, temperature=0.7, top_k=12, top_p=0.9, min_p=0.1, repetition_penalty=1.3)
    ids, mask = _ragged(np.random.default_rng(4), batch=3, seq=20, pads=(0, 4, 9))
    ids = np.tile(ids, (8, 1))
    mask = np.tile(mask, (8, 1))
    logits = np.random.default_rng(5).normal(size=(24, ref.config.vocab_size)).astype(np.float32) * 3
    processors = ref._get_logits_processor(
        GenerationConfig(**fields), input_ids_seq_length=20, model_kwargs={"attention_mask": torch.tensor(mask)}
    )
    names = [type(p).__name__ for p in processors]
    warpers = ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper"]
    assert names == ["RepetitionPenaltyLogitsProcessor", *(warpers if do_sample else [])]
    want = processors(torch.tensor(ids), torch.tensor(logits)).numpy()
    seen = jax.vmap(lambda i, m: present(i, m, logits.shape[1]))(jnp.asarray(ids), jnp.asarray(mask, bool))
    _assert_same_logits(_ours(logits, SamplingConfig(**fields), seen), want)


def test_greedy_repetition_penalty_matches_transformers(pair):
    """Greedy with a repetition penalty, a ragged left-padded batch, 30 new tokens."""
    name, ref, model = pair
    ids, mask = _ragged(np.random.default_rng(2))
    want = _hf_generate(ref, ids, mask, 30, eos_token_id=[], pad_token_id=0, repetition_penalty=3.0)
    sampling = SamplingConfig(repetition_penalty=3.0)
    got = np.asarray(eqxlm.generate(model, ids, mask, max_new_tokens=30, eos_token_id=[], sampling=sampling))
    np.testing.assert_array_equal(got, want)
    plain = np.asarray(eqxlm.generate(model, ids, mask, max_new_tokens=30, eos_token_id=[]))
    assert not np.array_equal(got, plain)  # the penalty changed the tokens


def test_samples_stay_in_the_allowed_set_and_follow_the_distribution():
    """The allowed set and the probabilities come from transformers' warpers and torch's
    softmax (the oracle); the draws from eqxlm's sampling path (`select_tokens`)."""
    from eqxlm.generation import select_tokens

    raw = np.random.default_rng(1).normal(size=32).astype(np.float32) * 2
    warped = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(6)(None, torch.tensor(raw)[None] / 1.5))[0]
    allowed = torch.isfinite(warped).numpy()
    probs = torch.softmax(warped, -1).numpy()
    assert allowed.sum() == 4  # top-k keeps 6, top-p then 4
    logits = jnp.broadcast_to(jnp.asarray(raw), (20000, 32))
    sampling = SamplingConfig(do_sample=True, temperature=1.5, top_k=6, top_p=0.8).values()
    draws = np.asarray(select_tokens(logits, jnp.zeros((20000, 32), bool), jax.random.key(0), sampling))
    assert allowed[draws].all()
    freq = np.bincount(draws, minlength=32) / len(draws)
    assert np.abs(freq - probs).max() < 0.02


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(temperature=0.0), "temperature must be a number > 0 (greedy is do_sample=False), got 0.0."),
        (dict(top_p=0.0), "top_p must be in (0, 1], or None (off), got 0.0."),
        (dict(top_k=0), "top_k must be an int >= 1, or None (off), got 0."),
        (dict(top_k=2.5), "top_k must be an int >= 1, or None (off), got 2.5."),
        (dict(min_p=1.5), "min_p must be in [0, 1], or None (off), got 1.5."),
        (dict(repetition_penalty=0.0), "repetition_penalty must be a number > 0 (1.0 = off), got 0.0."),
        (dict(repetition_penalty=float("nan")), "repetition_penalty must be a number > 0 (1.0 = off), got nan."),
        (dict(do_sample="yes"), "do_sample must be True or False, got 'yes'."),
    ],
)
def test_sampling_config_refuses_a_bad_field_when_made(fields, message):
    with pytest.raises(SamplingConfigError, match="^SamplingConfig: ") as info:
        SamplingConfig(**{"do_sample": True, **fields})
    assert str(info.value) == "SamplingConfig: " + message
    assert info.value.field == next(iter(fields))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sampling=SamplingConfig(do_sample=True)), "key"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=61), "max_position_embeddings"),
    ],
)
def test_invalid_settings_raise_before_compiling(small, kwargs, match):
    with pytest.raises(ValueError, match=match):
        eqxlm.generate(small, np.array([[1, 2, 3, 4]]), **{"max_new_tokens": 8, **kwargs})


def test_no_recompile_for_new_prompt_sampling_values_or_key_in_a_bucket(small):
    compiles = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    kw = dict(max_new_tokens=10, eos_token_id=[])
    first = SamplingConfig(do_sample=True, temperature=0.9, top_k=8)
    eqxlm.generate(small, np.array([[1, 2, 3]]), sampling=first, key=jax.random.key(0), **kw)
    compiles.clear()
    second = SamplingConfig(do_sample=True, temperature=1.3, top_p=0.7, min_p=0.05, repetition_penalty=1.4)
    eqxlm.generate(small, np.array([[4, 5, 6, 7, 8]]), sampling=second, key=jax.random.key(9), **{**kw, "max_new_tokens": 12})
    assert bucket_length(3) == bucket_length(5)
    assert not [c for c in compiles], f"recompiled {len(compiles)} time(s)"
