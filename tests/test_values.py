"""Training and model surgery checked by value, against hand computations in numpy."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf import tiny_mistral

import eqxlm
from eqxlm.nn import attention_frames
from eqxlm.nn._alibi import alibi_slopes
from eqxlm.training import batch_loss, make_optimizer, train_step


@pytest.fixture(scope="module")
def model():
    return tiny_mistral(3, vocab_size=40, sliding_window=None)


# two rows, the second left-padded by 3: the scored pairs are (t, t+1) with both real
IDS = np.array([[5, 9, 2, 31, 7, 7, 18, 3], [0, 0, 0, 11, 4, 26, 9, 1]], np.int32)
MASK = np.array([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]], bool)


def _hand_loss(model, ids, mask):
    """Mean over scored pairs of -log softmax(logits[t])[ids[t+1]], in float64 numpy."""
    total, count = 0.0, 0
    for row, row_mask in zip(ids, mask, strict=True):
        logits = np.asarray(model(jnp.asarray(row), jnp.asarray(row_mask)).logits, np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        for t in range(len(row) - 1):
            if row_mask[t] and row_mask[t + 1]:
                total -= logp[t, row[t + 1]]
                count += 1
    assert count == 7 + 4
    return total / count


def test_train_step_loss_equals_hand_computation_and_decreases(model):
    want = _hand_loss(model, IDS, MASK)
    ids, mask = jnp.asarray(IDS), jnp.asarray(MASK)
    np.testing.assert_allclose(float(batch_loss(model, ids, mask)), want, rtol=1e-6)
    optimizer = make_optimizer(1e-2, total_steps=8, warmup_steps=1)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    losses = []
    for _ in range(6):
        model, opt_state, loss = train_step(model, opt_state, ids, mask, optimizer=optimizer)
        losses.append(float(loss))
    np.testing.assert_allclose(losses[0], want, rtol=1e-6)  # the loss before the first update
    # the reported loss of each step is the loss of the parameters it started from
    np.testing.assert_allclose(float(batch_loss(model, ids, mask)), _hand_loss(model, IDS, MASK), rtol=1e-6)
    assert losses[1] == losses[0], losses  # the warmup schedule starts at learning rate 0
    assert all(b < a for a, b in zip(losses[1:], losses[2:], strict=False)), losses
    assert losses[-1] < 0.8 * losses[0], losses


def test_surgery_swapping_rotary_for_alibi_gives_the_alibi_attention_by_hand():
    """One `eqx.tree_at` puts ALiBi in a Mistral layer; that layer's attention then equals
    ALiBi attention written from the definition in numpy: no rotation, scores
    `q.k / sqrt(d) + m_h * j`, causal softmax, grouped kv heads."""
    base = tiny_mistral(4, vocab_size=40, sliding_window=None, num_hidden_layers=1, initializer_range=0.3)
    swapped = eqx.tree_at(lambda m: m.model.layers[0].self_attn.position_scheme, base, eqxlm.nn.ALiBi(4))
    attn = swapped.model.layers[0].self_attn
    seq, heads, kv_heads, dim = 6, 4, 2, 8
    x = np.random.default_rng(0).normal(size=(seq, 32)).astype(np.float32)
    (frame,), _ = attention_frames((None,), jnp.arange(seq, dtype=jnp.int32), jnp.ones(seq, bool))
    got = np.asarray(attn(jnp.asarray(x), frame)[0])

    def proj(p, n):
        return (x.astype(np.float64) @ np.asarray(p.weight, np.float64).T).reshape(seq, n, dim)

    q, k, v = proj(attn.q_proj, heads), proj(attn.k_proj, kv_heads), proj(attn.v_proj, kv_heads)
    slopes = 2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)  # the paper's slopes for 4 heads
    np.testing.assert_allclose(alibi_slopes(heads), slopes, rtol=1e-7)
    out = np.zeros((seq, heads, dim))
    for h in range(heads):
        kh = h // (heads // kv_heads)
        scores = q[:, h] @ k[:, kh].T / np.sqrt(dim) + slopes[h] * np.arange(seq)[None, :]
        scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, h] = (w / w.sum(-1, keepdims=True)) @ v[:, kh]
    want = out.reshape(seq, heads * dim) @ np.asarray(attn.o_proj.weight, np.float64).T
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # the stock layer (rotary) gives something else, and the rest of the model is untouched
    stock = np.asarray(base.model.layers[0].self_attn(jnp.asarray(x), frame)[0])
    assert np.abs(stock - want).max() > 0.1
    same = lambda m: [leaf for leaf in jax.tree.leaves(m) if eqx.is_array(leaf)]  # noqa: E731
    for a, b in zip(same(base), same(swapped), strict=True):
        assert a is b
