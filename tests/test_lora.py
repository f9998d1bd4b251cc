"""`eqxlm.lora` against PEFT (the test oracle): adapters saved by eqxlm load in PEFT with the
same logits, adapters saved by PEFT (non-zero B) load in eqxlm with the same logits, merged
equals unmerged; fused checkpoint projections (BLOOM's `query_key_value`, GPT-2's `c_attn`,
scanned); training only the adapters on the default model's data lowers the loss."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
from hf import hf_model, run_hf, save_hf

import eqxlm
from eqxlm import lora, training

CASES = {
    "llama": ("llama", ["q_proj", "v_proj", "down_proj"], False),
    "qwen2": ("qwen2", ["q_proj", "k_proj", "o_proj", "gate_proj"], False),
    "bloom-scanned": ("bloom", ["query_key_value", "dense_4h_to_h"], True),
    "gpt2": ("gpt2", ["c_attn", "c_proj"], False),
    "mixtral": ("mixtral", ["q_proj", "v_proj", "o_proj"], False),
}
IDS = np.array([3, 17, 5, 40, 22, 9, 1, 33])


def _nodes(model):
    return [x for x in jax.tree.leaves(model, is_leaf=lambda x: isinstance(x, lora.LoRALinear)) if isinstance(x, lora.LoRALinear)]


def _random_b(model, seed=0):
    nodes = _nodes(model)
    new = [0.3 * jax.random.normal(jax.random.key(seed + i), n.lora_B.shape, n.lora_B.dtype) for i, n in enumerate(nodes)]
    return eqx.tree_at(lambda m: [n.lora_B for n in _nodes(m)], model, new)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    family, targets, scan = CASES[request.param]
    path = save_hf(hf_model(family), tmp_path_factory.mktemp(request.param))
    return family, targets, eqxlm.from_pretrained(path, scan_layers=scan)


def test_eqxlm_adapter_loads_in_peft_with_the_same_logits(case, tmp_path):
    family, targets, model = case
    config = lora.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    adapted = lora.add_adapters(model, config, key=jax.random.key(0))
    ids = jnp.asarray(IDS)
    np.testing.assert_array_equal(adapted(ids).logits, model(ids).logits)  # B = 0
    adapted = _random_b(adapted)
    lora.save_adapter(adapted, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and sorted(saved["target_modules"]) == sorted(targets)
    ref = peft.PeftModel.from_pretrained(hf_model(family), tmp_path).eval()
    got = np.asarray(adapted(ids).logits)
    np.testing.assert_allclose(got, run_hf(ref, IDS[None]).logits[0].numpy(), atol=1e-4)
    assert np.abs(got - np.asarray(model(ids).logits)).max() > 0.1
    merged = lora.merge(adapted)
    np.testing.assert_allclose(merged(ids).logits, got, atol=1e-4)
    np.testing.assert_allclose(lora.merge_and_unload(adapted)(ids).logits, got, atol=1e-4)
    unmerged = lora.unmerge(merged)
    np.testing.assert_allclose(unmerged(ids).logits, got, atol=1e-5)
    for a, b in zip(jax.tree.leaves(unmerged), jax.tree.leaves(adapted), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_peft_adapter_loads_in_eqxlm_with_the_same_logits(case, tmp_path):
    family, targets, model = case
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False, use_rslora=True)
    ref = peft.get_peft_model(hf_model(family), config).eval()
    ref.save_pretrained(tmp_path)
    adapted = lora.load_adapter(model, tmp_path)
    np.testing.assert_allclose(adapted(jnp.asarray(IDS)).logits, run_hf(ref, IDS[None]).logits[0].numpy(), atol=1e-4)


def test_fused_adapter_trained_apart_saves_exactly_at_a_higher_rank(tmp_path):
    ref = hf_model("bloom")
    path = save_hf(ref, tmp_path / "base")
    model = eqxlm.from_pretrained(path)
    adapted = _random_b(
        lora.add_adapters(model, lora.LoraConfig(r=2, lora_alpha=4, target_modules=["query_key_value"]), key=jax.random.key(1))
    )
    k_proj = lambda m: m.model.layers[0].self_attn.k_proj.lora_A  # noqa: E731
    adapted = eqx.tree_at(k_proj, adapted, k_proj(adapted) + 0.5)  # the parts' A differ now
    lora.save_adapter(adapted, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert list(saved["rank_pattern"].values()) == [6] and len(saved["rank_pattern"]) == 1
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    np.testing.assert_allclose(adapted(jnp.asarray(IDS)).logits, run_hf(peft_model, IDS[None]).logits[0].numpy(), atol=1e-4)


def test_unsupported_options_are_refused_by_name(tmp_path):
    model = eqxlm.from_pretrained("eqxlm/default")
    adapted = lora.add_adapters(model, lora.LoraConfig(target_modules=["q_proj"]), key=jax.random.key(0))
    lora.save_adapter(adapted, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    for field, value, message in [
        ("use_dora", True, "DoRA"),
        ("peft_type", "IA3", "peft_type 'IA3'"),
        ("bias", "all", "bias 'all'"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
    ]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, field: value}))
        with pytest.raises(ValueError, match=message):
            lora.load_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="embed_tokens is not a linear projection"):
        lora.add_adapters(model, lora.LoraConfig(target_modules=["embed_tokens"]), key=jax.random.key(0))
    with pytest.raises(ValueError, match="match no projection"):
        lora.add_adapters(model, lora.LoraConfig(target_modules=["c_attn"]), key=jax.random.key(0))


@pytest.mark.slow  # about a minute on two shared cores
def test_training_only_the_adapters_lowers_the_loss_on_the_default_models_data(tmp_path):
    import pydoc_data.topics

    from eqxlm.tokenizer import load_tokenizer

    path = eqxlm.default.default_model_path()
    model = eqxlm.from_pretrained(path)
    tokenizer = load_tokenizer(path)
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in ("assert", "break", "continue", "pass"))
    tokens = np.asarray(tokenizer.encode(text), np.int32)
    config = lora.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.05)
    adapted = lora.add_adapters(model, config, key=jax.random.key(0))
    optimizer = training.make_optimizer(3e-3, total_steps=30, weight_decay=0.0)
    opt_state = optimizer.init(eqx.filter(adapted, lora.trainable(adapted)))
    before = training.evaluate(adapted, tokens, seq_len=64)["loss"]
    for step, batch in zip(range(30), training.random_batches(tokens, batch_size=8, seq_len=64, seed=0), strict=False):
        noisy = lora.with_dropout(adapted, jax.random.key(step))
        noisy, opt_state, _ = training.train_step(
            noisy, opt_state, jnp.asarray(batch), optimizer=optimizer, trainable=lora.trainable(noisy)
        )
        adapted = lora.with_dropout(noisy, None)
    after = training.evaluate(adapted, tokens, seq_len=64)["loss"]
    assert after < before - 0.2, (before, after)
    is_lora = lambda x: isinstance(x, lora.LoRALinear)  # noqa: E731
    stripped = jax.tree.map(lambda x: lora._plain(x, x.weight) if is_lora(x) else x, adapted, is_leaf=is_lora)
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(stripped), strict=True):
        assert np.array_equal(a, b)  # the base weights did not move
    lora.save_adapter(adapted, tmp_path)
    adapter_bytes = (tmp_path / "adapter_model.safetensors").stat().st_size
    model_bytes = (path / "model.safetensors").stat().st_size
    assert adapter_bytes < 0.1 * model_bytes
    reloaded = lora.load_adapter(model, tmp_path)
    np.testing.assert_allclose(reloaded(jnp.asarray(tokens[:32])).logits, adapted(jnp.asarray(tokens[:32])).logits, atol=1e-5)
    print(f"LoRA fine-tune: loss {before:.3f} -> {after:.3f}; adapter {adapter_bytes:,} bytes, model {model_bytes:,} bytes")
