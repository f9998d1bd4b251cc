"""Decoding far past 32k positions with a sliding-window model keeps a window-sized cache and
transformers' numbers (issue #18, long context)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from conftest import LOGITS_ATOL
from hf import hf_model, run_hf, save_hf

import eqxlm

WINDOW = 4
STEPS = 33_000  # past 2**15 positions


def test_sliding_window_decodes_past_32k_positions_with_a_window_sized_cache(tmp_path):
    """A 2-layer Mistral with window 4, decoded one token at a time from position 0 to 33,000
    with a cache that holds 4 entries per layer (not 33,000). Each layer sees 4 keys, so the
    last token's logits depend on the last 7 tokens only: transformers (float32, eager) on the
    last 16 tokens with their true position ids (rotary angles at ~33k) gives the reference for
    the last 10 positions, within the logits tolerance."""
    ref = hf_model("mistral", sliding_window=WINDOW, max_position_embeddings=65_536)
    model = eqxlm.from_pretrained(save_hf(ref, tmp_path / "m"))
    cache = model.init_cache(STEPS)
    assert all(layer.keys.shape[0] == WINDOW for layer in cache.layers), [c.keys.shape for c in cache.layers]
    ids = np.random.default_rng(0).integers(0, ref.config.vocab_size, STEPS).astype(np.int32)

    @eqx.filter_jit
    def decode(model, ids, cache):
        def body(cache, token):
            out = model(token[None], cache=cache)
            return out.cache, out.logits[0]

        cache, logits = jax.lax.scan(body, cache, ids)
        return cache, logits[-16:]

    cache, last = decode(model, jnp.asarray(ids), cache)
    assert int(cache.next_position) == STEPS
    tail = ids[-16:]
    want = run_hf(ref, tail[None], position_ids=np.arange(STEPS - 16, STEPS)[None]).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(last)[6:], want[6:], atol=LOGITS_ATOL, rtol=0)
    # and the first 6 of the 16, which see tokens before the tail, do differ from the cut reference
    assert np.abs(np.asarray(last)[:6] - want[:6]).max() > 10 * LOGITS_ATOL
