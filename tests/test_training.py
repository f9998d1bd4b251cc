"""Training utilities: the loss equals transformers', steps learn, remat changes nothing, runs repeat."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import torch
from _train_fixtures import RecordingBar
from hf import hf_model, save_hf, tiny_mistral

import eqxlm
from eqxlm.training import (
    batch_loss as _batch_loss,
)
from eqxlm.training import (
    evaluate,
    fit,
    make_optimizer,
    random_batches,
    remat_layers,
    train_step,
    unremat_layers,
)

# jitted in the tests: eager op-by-op dispatch (and eager gradients) of a model is several
# times slower for one-off calls
batch_loss = eqx.filter_jit(_batch_loss)


def _tiny(seed=0):
    return tiny_mistral(seed, vocab_size=48)


def test_loss_matches_transformers_labels_loss(tmp_path):
    ref = hf_model("llama")
    ours = eqxlm.from_pretrained(save_hf(ref, tmp_path))
    ids = np.random.default_rng(0).integers(0, 96, size=(3, 17))
    with torch.no_grad():
        want = float(ref(torch.tensor(ids), labels=torch.tensor(ids)).loss)
    got = float(batch_loss(ours, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_loss_mask_leaves_targets_out():
    model = _tiny()
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 48, size=(2, 12)), jnp.int32)
    mask = jnp.ones((2, 12), bool)
    assert float(batch_loss(model, ids, mask)) == float(batch_loss(model, ids))
    left = mask.at[:, :4].set(False)  # left padding: those targets are not scored
    padded_loss = float(batch_loss(model, ids, left))
    unpadded = float(batch_loss(model, ids[:, 4:]))
    np.testing.assert_allclose(padded_loss, unpadded, rtol=1e-5)


def test_train_steps_reduce_the_loss_on_a_repeated_text():
    tokens = np.tile(np.arange(40, dtype=np.int32) % 48, 50)
    model, history = fit(_tiny(), tokens, steps=60, batch_size=8, seq_len=32, learning_rate=3e-3, progress=False, log_every=10)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert evaluate(model, tokens[:400], seq_len=32)["loss"] < history[0]["loss"]


def test_remat_gives_the_same_loss_and_gradients():
    model = _tiny()
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 48, size=(2, 16)), jnp.int32)
    grad = eqx.filter_jit(eqx.filter_grad(_batch_loss))
    plain, checkpointed = grad(model, ids), unremat_layers(grad(remat_layers(model), ids))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(checkpointed), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert eqxlm.state_dict(unremat_layers(remat_layers(model))).keys() == eqxlm.state_dict(model).keys()
    assert eqxlm.state_dict(remat_layers(model)).keys() == eqxlm.state_dict(model).keys()  # `Remat` is transparent


def test_same_seed_same_run():
    tokens = np.random.default_rng(3).integers(0, 48, size=3000).astype(np.int32)
    runs = [fit(_tiny(), tokens, steps=12, batch_size=4, seq_len=16, progress=False, log_every=4)[1] for _ in range(2)]
    assert [h["loss"] for h in runs[0]] == [h["loss"] for h in runs[1]]


def test_fit_progress_bar_shows_each_loss_at_its_own_step(monkeypatch):
    import eqxlm.training

    monkeypatch.setattr(eqxlm.training, "tqdm", RecordingBar)
    tokens = np.arange(500, dtype=np.int32) % 48
    _, history = fit(_tiny(), tokens, steps=4, batch_size=2, seq_len=8, log_every=2)
    assert RecordingBar.shown == [(h["step"], f"{h['loss']:.3f}") for h in history] and len(history) == 2


def test_train_step_and_batches_compose_by_hand():
    tokens = np.arange(500, dtype=np.int32) % 48
    optimizer = make_optimizer(1e-3, total_steps=3)
    model = _tiny()
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    batches = random_batches(tokens, batch_size=2, seq_len=8, seed=0)
    first = next(random_batches(tokens, batch_size=2, seq_len=8, seed=0))
    for _ in range(3):
        model, opt_state, loss = train_step(model, opt_state, jnp.asarray(next(batches)), optimizer=optimizer)
    assert np.isfinite(float(loss)) and first.shape == (2, 8)


def test_train_step_keeps_the_batch_and_the_base_model():
    """Only the optimiser state is donated: a batch fed twice and the base model under LoRA
    adapters (sharing its frozen weights) stay usable."""
    from eqxlm import lora

    base = _tiny()
    config = lora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    adapted = lora.add_adapters(base, config, key=jax.random.key(0))
    trainable = lora.trainable(adapted)
    optimizer = make_optimizer(3e-3, total_steps=4, warmup_steps=0)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(eqx.filter(adapted, trainable))
    batch = jnp.asarray(np.tile(np.arange(1, 33) % 48, (4, 1)), jnp.int32)
    mask = jnp.ones(batch.shape, bool)
    losses = []
    for _ in range(2):
        adapted, opt_state, loss = train_step(adapted, opt_state, batch, mask, optimizer=optimizer, trainable=trainable)
        losses.append(float(loss))
    assert not batch.is_deleted() and not mask.is_deleted()
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(eqx.filter(base, eqx.is_array)))
    assert losses[1] < losses[0]  # the second step saw the first one's update


def test_weight_decay_reaches_matrices_only():
    """With zero gradients Adam's step is zero and only the decoupled decay moves a weight:
    `w * (1 - lr * decay)` for projections, embeddings and the head; norms and biases stay."""
    config = eqxlm.Qwen2Config(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)  # fmt: skip
    model = eqxlm.DecoderLM(config, key=jax.random.key(0))
    lr, decay = 1e-2, 0.5
    optimizer = make_optimizer(lr, total_steps=10, warmup_steps=0, weight_decay=decay)  # step 0 at the peak rate
    params = eqx.filter(model, eqx.is_array)
    with jax.numpy_dtype_promotion("standard"):
        updates, _ = jax.jit(optimizer.update)(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    before, after = eqxlm.state_dict(model), eqxlm.state_dict(eqx.apply_updates(model, updates))
    kept = {name for name in before if name.endswith(".bias") or "norm" in name}
    assert any(n.endswith("q_proj.bias") for n in kept) and any(n.endswith("layernorm.weight") for n in kept)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= before.keys() - kept
    for name, value in before.items():
        want = np.asarray(value) if name in kept else np.asarray(value) * np.float32(1 - lr * decay)
        np.testing.assert_allclose(np.asarray(after[name]), want, rtol=1e-6, err_msg=name)
