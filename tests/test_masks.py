import jax.numpy as jnp
import numpy as np
import torch
from hf import hf_mask
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

from eqxlm.nn import attention_mask, causal_mask, padding_mask, sliding_window_mask


def _hf(fn, q_slots, k_slots):
    q = torch.tensor(np.asarray(q_slots))[:, None]
    k = torch.tensor(np.asarray(k_slots))[None, :]
    return fn(0, 0, q, k).numpy()


def _slots(offset, seq, kv_seq):
    return jnp.arange(seq, dtype=jnp.int32) + offset, jnp.arange(kv_seq, dtype=jnp.int32)


def test_causal_matches_hf_with_offset():
    q, k = _slots(5, 3, 8)  # a block of 3 queries starting at slot 5 of 8 keys (cached decode)
    np.testing.assert_array_equal(np.asarray(causal_mask(q, k)), _hf(causal_mask_function, q, k))


def test_sliding_window_matches_hf_and_sees_exactly_w_keys():
    for window in (1, 3, 4):
        q, k = _slots(0, 12, 12)
        got = np.asarray(sliding_window_mask(q, k, window))
        np.testing.assert_array_equal(got, _hf(sliding_window_causal_mask_function(window), q, k))
        assert got.sum(axis=1).max() == window  # W keys counting itself, not W+1 (the old Flax port)
        q, k = _slots(9, 2, 11)
        np.testing.assert_array_equal(
            np.asarray(sliding_window_mask(q, k, window)), _hf(sliding_window_causal_mask_function(window), q, k)
        )


@st.composite
def _case(draw):
    kv_seq = draw(st.integers(1, 24))
    seq = draw(st.integers(1, kv_seq))
    offset = kv_seq - seq  # the queries are the last `seq` keys
    valid = draw(st.lists(st.booleans(), min_size=kv_seq, max_size=kv_seq))
    window = draw(st.one_of(st.none(), st.integers(1, 30)))
    return seq, kv_seq, offset, np.array(valid), window


@settings(max_examples=150, deadline=None)
@given(_case())
def test_mask_properties(case):
    seq, kv_seq, offset, valid, window = case
    q, k = _slots(offset, seq, kv_seq)
    mask = np.asarray(attention_mask(q, k, jnp.asarray(valid), window))
    np.testing.assert_array_equal(mask, hf_mask(seq, kv_seq, window, padding=valid, q_offset=offset))  # masking_utils
    future = np.asarray(k)[None, :] > np.asarray(q)[:, None]
    assert not (mask & future).any(), "a query saw a future key"
    assert not (mask & ~valid[None, :]).any(), "a query saw a padded key"
    for i in range(seq):  # every real query sees itself
        if valid[offset + i]:
            assert mask[i, offset + i]
    if window is not None and window >= kv_seq:  # a window as long as the sequence is causal
        causal = np.asarray(causal_mask(q, k) & padding_mask(jnp.asarray(valid)))
        np.testing.assert_array_equal(mask, causal)
    if window is not None:
        assert mask.sum(axis=1).max(initial=0) <= window
