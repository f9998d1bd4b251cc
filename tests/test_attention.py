import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import LAYER_ATOL, PART_ATOL
from hf import additive_mask, copy_from_torch, hf_config, hf_mask
from transformers.models.bloom.modeling_bloom import BloomAttention as TorchBloomAttention
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding, eager_attention_forward, repeat_kv
from transformers.models.mistral.modeling_mistral import MistralAttention

import eqxlm
from eqxlm.nn import ALiBi, Attention, RotaryEmbedding, attention_frames, dot_product_attention
from eqxlm.params import Fused, KeyMap

RNG = np.random.default_rng(0)


def _randn(*shape):
    return RNG.normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_gqa_core_matches_repeat_kv_and_eager_attention(heads, kv_heads):
    q, k, v = _randn(5, heads, 8), _randn(7, kv_heads, 8), _randn(7, kv_heads, 8)
    mask = np.tril(np.ones((5, 7), bool), k=2)
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False)
    tq, tk, tv = (torch.tensor(a).transpose(0, 1)[None] for a in (q, k, v))
    want, want_w = eager_attention_forward(module, tq, tk, tv, additive_mask(mask), scaling=8**-0.5)
    out, weights = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out), want[0].numpy(), atol=PART_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(weights), want_w[0].numpy(), atol=PART_ATOL, rtol=0)
    # repeat_kv is repeat_interleave: query head h reads kv head h // g
    rep = repeat_kv(tk, heads // kv_heads)[0].numpy()
    for h in range(heads):
        np.testing.assert_array_equal(rep[h], k[:, h // (heads // kv_heads)])


@pytest.mark.parametrize("seq", [8, 11])
@pytest.mark.parametrize("per_query", [True, False])
def test_long_prompts_attend_in_query_blocks_with_the_same_numbers(monkeypatch, seq, per_query):
    """Without weights, queries past QUERY_CHUNK go in blocks (lax.map) with a remainder:
    every output row equals transformers' eager attention (and the one-block result), for
    a per-query mask and ALiBi-style bias and for broadcast ones, with GQA and a soft-cap."""
    from eqxlm.nn import _attention

    monkeypatch.setattr(_attention, "QUERY_CHUNK", 4)
    heads, kv_heads, kv_seq = 4, 2, seq + 3
    q, k, v = _randn(seq, heads, 8), _randn(kv_seq, kv_heads, 8), _randn(kv_seq, kv_heads, 8)
    if per_query:
        mask = np.tril(np.ones((seq, kv_seq), bool), k=3) & ~np.tril(np.ones((seq, kv_seq), bool), k=-3)
        bias = _randn(heads, seq, kv_seq)
    else:
        mask = np.arange(kv_seq)[None] % 5 != 1
        bias = _randn(heads, 1, kv_seq)
    args = [jnp.asarray(a) for a in (q, k, v)]
    kw = dict(mask=jnp.asarray(mask), bias=jnp.asarray(bias), softcap=2.0)
    blocked, none = dot_product_attention(*args, **kw, return_weights=False)
    whole, _ = dot_product_attention(*args, **kw, return_weights=True)
    assert none is None
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), atol=1e-6, rtol=0)
    # transformers' eager attention with the same soft-cap and bias folded into its additive mask
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False)
    tq, tk, tv = (torch.tensor(a).transpose(0, 1)[None] for a in (q, k, v))
    scores = torch.matmul(tq, repeat_kv(tk, 2).transpose(2, 3)) * 8**-0.5
    capped = torch.tanh(scores / 2.0) * 2.0
    additive = torch.tensor(np.broadcast_to(bias, (heads, seq, kv_seq)))[None] + (capped - scores)
    additive = additive + additive_mask(np.broadcast_to(mask, (seq, kv_seq)))
    want, _ = eager_attention_forward(module, tq, tk, tv, additive, scaling=8**-0.5)
    np.testing.assert_allclose(np.asarray(blocked), want[0].numpy(), atol=PART_ATOL, rtol=0)


@pytest.mark.parametrize("window", [None, 3])
def test_query_blocks_read_only_the_keys_they_may_see(monkeypatch, window):
    """`visible=(0, window)`, what `attention_frames` promises without a cache: each query
    block reads only the keys its causal or sliding-window mask leaves visible. Every query
    that sees a key gets the whole-matrix numbers (left padding, a per-query bias, GQA, a
    soft-cap); and the promise is relied on: with a mask that breaks it, the blocks differ."""
    from eqxlm.nn import _attention, attention_mask

    monkeypatch.setattr(_attention, "QUERY_CHUNK", 4)
    seq, heads, kv_heads = 11, 4, 2
    args = [jnp.asarray(a) for a in (_randn(seq, heads, 8), _randn(seq, kv_heads, 8), _randn(seq, kv_heads, 8))]
    valid = np.arange(seq) >= 2  # two left-padded tokens
    slots = jnp.arange(seq, dtype=jnp.int32)
    key_slots = jnp.where(jnp.asarray(valid), slots, -1)
    mask = attention_mask(slots, key_slots, key_slots >= 0, window)
    kw = dict(bias=jnp.asarray(_randn(heads, seq, seq)), softcap=2.0)
    blocked, none = dot_product_attention(*args, mask=mask, **kw, return_weights=False, visible=(0, window))
    whole, _ = dot_product_attention(*args, mask=mask, **kw, return_weights=True)
    assert none is None
    np.testing.assert_allclose(np.asarray(blocked)[valid], np.asarray(whole)[valid], atol=1e-6, rtol=0)
    everything = jnp.ones((seq, seq), bool)
    blocked, _ = dot_product_attention(*args, mask=everything, **kw, return_weights=False, visible=(0, window))
    whole, _ = dot_product_attention(*args, mask=everything, **kw, return_weights=True)
    assert not np.allclose(np.asarray(blocked)[:4], np.asarray(whole)[:4], atol=1e-3)


def _llama_family(cls, kind, window=None, **overrides):
    config = hf_config(kind, **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = cls(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    ours = Attention(
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        head_dim,
        qkv_bias=getattr(config, "attention_bias", False),
        o_bias=getattr(config, "attention_bias", False),
        position_scheme=RotaryEmbedding(head_dim, 10000.0),
        sliding_window=window,
        key=jax.random.key(0),
    )
    return config, ref, copy_from_torch(ours, ref)


@pytest.mark.parametrize(
    "cls,kind,window,overrides",
    [
        (LlamaAttention, "llama", None, {}),
        (LlamaAttention, "llama", None, {"attention_bias": True, "num_key_value_heads": 1}),
        (MistralAttention, "mistral", 3, {}),
        (MistralAttention, "mistral", None, {"head_dim": 16}),
    ],
)
def test_attention_module_matches_hf(cls, kind, window, overrides):
    config, ref, ours = _llama_family(cls, kind, window, **overrides)
    seq = 9
    x = _randn(seq, config.hidden_size)
    valid = np.array([False, False] + [True] * (seq - 2))  # left padding
    positions = np.maximum(np.cumsum(valid) - 1, 0) * valid
    mask = hf_mask(seq, seq, window, padding=valid)  # transformers' masking_utils, not eqxlm's
    cos, sin = LlamaRotaryEmbedding(config)(torch.tensor(x), torch.tensor(positions)[None])
    with torch.no_grad():
        want, _ = ref(torch.tensor(x)[None], position_embeddings=(cos, sin), attention_mask=additive_mask(mask))
    (frame,), _ = attention_frames((window,), jnp.asarray(positions, jnp.int32), jnp.asarray(valid))
    got, _, _ = ours(jnp.asarray(x), frame)
    np.testing.assert_allclose(np.asarray(got)[valid], want[0].numpy()[valid], atol=LAYER_ATOL, rtol=0)


@pytest.mark.parametrize("heads", [4, 6])
def test_bloom_attention_matches_hf_with_fused_per_head_qkv(heads):
    config = hf_config("bloom", hidden_size=heads * 8, n_head=heads)
    torch.manual_seed(0)
    ref = TorchBloomAttention(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    attn = Attention(heads * 8, heads, qkv_bias=True, o_bias=True, position_scheme=ALiBi(heads), key=jax.random.key(0))
    bloom_names = KeyMap(
        renames=((r"^o_proj", "dense"),), fused=(Fused("query_key_value", ("q_proj", "k_proj", "v_proj"), heads),)
    )
    ours = copy_from_torch(attn, ref, key_map=bloom_names)
    seq = 8
    x = _randn(seq, heads * 8)
    mask2d = np.array([[0, 1, 1, 1, 1, 1, 1, 1]])
    valid = mask2d[0].astype(bool)
    alibi = build_alibi_tensor(torch.tensor(mask2d), heads, torch.float32)
    mask = hf_mask(seq, seq, padding=valid)
    with torch.no_grad():
        want, want_w = ref(torch.tensor(x)[None], torch.zeros(1, seq, heads * 8), alibi, additive_mask(mask))
    positions = jnp.asarray(np.maximum(np.cumsum(valid) - 1, 0) * valid, jnp.int32)
    (frame,), _ = attention_frames((None,), positions, jnp.asarray(valid))
    got, weights, _ = ours(jnp.asarray(x), frame, return_weights=True)
    np.testing.assert_allclose(np.asarray(got)[valid], want[0].numpy()[valid], atol=LAYER_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(weights)[:, valid], want_w[0].numpy()[:, valid], atol=LAYER_ATOL, rtol=0)


def _cache(size, window, rolling):
    """A one-layer model cache of `size` entries for attention of `window`."""
    from eqxlm.nn import Cache, KVCache, SlotTable

    zero = jnp.zeros((), jnp.int32)
    return Cache(
        layers=(KVCache.init(size, 2, 8),),
        tables=(SlotTable.init(size, rolling=rolling),),
        end=zero,
        next_position=zero,
        windows=(window,),
    )


def _run(attn, x, positions, valid, cache=None):
    frames, cache = attention_frames((attn.sliding_window,), positions, valid, cache)
    out, _, layer = attn(x, frames[0], None if cache is None else cache.layers[0])
    return out, None if cache is None else eqxlm.nn.Cache(
        cache.layers[:0] + (layer,), cache.tables, cache.end, cache.next_position, cache.windows
    )


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("position_scheme", ["rotary", "alibi"])
def test_cached_blocks_equal_one_full_pass(window, position_scheme):
    """Prefill 5 tokens, then 1, 1, 3, 1: the same outputs as attending over all 11 at once,
    with a linear cache and (for a window) a rolling buffer of the window's size."""
    scheme = RotaryEmbedding(8, 10000.0) if position_scheme == "rotary" else ALiBi(4)
    attn = Attention(32, 4, 2, 8, position_scheme=scheme, sliding_window=window, key=jax.random.key(1))
    seq = 11
    x = jnp.asarray(_randn(seq, 32))
    positions = jnp.arange(seq, dtype=jnp.int32)
    valid = jnp.ones(seq, bool)
    full, _ = _run(attn, x, positions, valid)
    for cache in (_cache(seq, window, False), _cache(window or seq, window, window is not None)):
        outs, start = [], 0
        for size in (5, 1, 1, 3, 1):
            block = slice(start, start + size)
            out, cache = _run(attn, x[block], positions[block], valid[block], cache)
            outs.append(out)
            start += size
        np.testing.assert_allclose(np.asarray(jnp.concatenate(outs)), np.asarray(full), atol=LAYER_ATOL, rtol=0)


def test_linear_cache_overflow_is_an_error():
    attn = Attention(16, 2, position_scheme=RotaryEmbedding(8, 10000.0), key=jax.random.key(0))
    with pytest.raises(Exception, match="KVCache overflow"):
        _run(attn, jnp.ones((5, 16)), jnp.arange(5, dtype=jnp.int32), jnp.ones(5, bool), _cache(4, None, False))


def test_attention_weights_are_returned_per_head_only_when_asked():
    attn = Attention(16, 2, key=jax.random.key(0))
    (frame,), _ = attention_frames((None,), jnp.arange(3, dtype=jnp.int32), jnp.ones(3, bool))
    _, weights, _ = attn(jnp.ones((3, 16)), frame, return_weights=True)
    assert weights.shape == (2, 3, 3)
    np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, atol=1e-6)
    assert attn(jnp.ones((3, 16)), frame)[1] is None


def test_per_head_weighted_qk_norm_and_interleaved_rotary_match_cohere_attention():
    """`qk_norm="head_weights"`: a bias-free LayerNorm per head with each head's own weight,
    stored `(heads, head_dim)`, as `CohereLayerNorm((heads, head_dim))`; with interleaved rotary."""
    import transformers
    from transformers.models.cohere.modeling_cohere import CohereAttention, CohereLayerNorm, CohereRotaryEmbedding

    from eqxlm.nn import LayerNorm

    config = transformers.CohereConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, use_qk_norm=True, layer_norm_eps=1e-5
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = CohereAttention(config, layer_idx=0).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    ours = Attention(
        32, 4, 2, 8,
        position_scheme=RotaryEmbedding(8, config.rope_parameters["rope_theta"], interleaved=True),
        qk_norm="head_weights",
        make_norm=lambda size: LayerNorm(size, 1e-5, use_bias=False),
        key=jax.random.key(0),
    )  # fmt: skip
    ours = copy_from_torch(ours, ref)
    assert ours.q_norm.weight.shape == (4, 8) and ours.k_norm.weight.shape == (2, 8)
    x = _randn(7, 32)
    # the norm alone, per head, at the parts' tolerance
    q = torch.tensor(x) @ ref.q_proj.weight.T
    want_q = CohereLayerNorm((4, 8), eps=1e-5)
    with torch.no_grad():
        want_q.weight.copy_(ref.q_norm.weight)
        want_q = want_q(q.view(7, 4, 8)).numpy()
    got_q = ours._project(ours.q_proj, ours.q_norm, jnp.asarray(x), 4)
    np.testing.assert_allclose(np.asarray(got_q), want_q, atol=PART_ATOL, rtol=0)
    # the whole module
    valid = np.ones(7, bool)
    positions = np.arange(7)
    mask = hf_mask(7, 7, padding=valid)  # transformers' masking_utils, not eqxlm's
    cos, sin = CohereRotaryEmbedding(config)(torch.tensor(x), torch.tensor(positions)[None])
    with torch.no_grad():
        want, _ = ref(torch.tensor(x)[None], position_embeddings=(cos, sin), attention_mask=additive_mask(mask))
    (frame,), _ = attention_frames((None,), jnp.asarray(positions, jnp.int32), jnp.asarray(valid))
    got, _, _ = ours(jnp.asarray(x), frame)
    np.testing.assert_allclose(np.asarray(got), want[0].numpy(), atol=LAYER_ATOL, rtol=0)


@pytest.mark.parametrize("scan", [False, True])
def test_a_long_prompt_in_query_blocks_gives_the_model_the_same_logits(monkeypatch, scan):
    """A whole model without a cache: queries in blocks of 4 that read only their visible
    keys (sliding-window and full layers, two left-padded tokens) give the logits of one
    block, at every real token; unrolled and scanned layers. Both kinds of layer take the
    visible-key path (a model that dropped the frame's promise would still pass the logits
    check, through the blocks that read every key)."""
    from eqxlm.nn import _attention

    config = eqxlm.Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=3, query_pre_attn_scalar=8,
    )  # fmt: skip
    model = eqxlm.DecoderLM(config, key=jax.random.key(0), scan_layers=scan)
    assert {frame.visible for frame in attention_frames((None, 3), jnp.arange(5), jnp.ones(5, bool))[0]} == {(0, None), (0, 3)}
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, 13), jnp.int32)
    valid = jnp.arange(13) >= 2
    want = model(ids, valid).logits
    monkeypatch.setattr(_attention, "QUERY_CHUNK", 4)
    seen, real = [], _attention._attend_visible
    monkeypatch.setattr(_attention, "_attend_visible", lambda *a, **kw: seen.append(a[5]) or real(*a, **kw))
    got = model(ids, valid).logits
    assert set(seen) == {(0, None), (0, 3)}
    np.testing.assert_allclose(np.asarray(got)[2:], np.asarray(want)[2:], atol=1e-5, rtol=0)
