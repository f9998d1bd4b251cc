"""`eqxlm.lora` against PEFT (the test oracle): adapters saved by eqxlm load in PEFT with the
same logits, adapters saved by PEFT (non-zero B) load in eqxlm with the same logits, merged
equals unmerged; fused checkpoint projections (BLOOM's `query_key_value`, GPT-2's `c_attn`,
scanned); training only the adapters on the default model's data lowers the loss."""

import dataclasses
import json
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from hf import hf_model, run_hf, save_hf
from safetensors.numpy import load_file, save_file

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
        ("peft_type", "IA3", "peft_type='IA3'"),
        ("bias", "all", "bias='all'"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
    ]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, field: value}))
        with pytest.raises(ValueError, match=message):
            lora.load_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="embed_tokens is not a linear projection"):
        lora.add_adapters(model, lora.LoraConfig(target_modules=["embed_tokens"]), key=jax.random.key(0))
    with pytest.raises(ValueError, match="match no projection"):
        lora.add_adapters(model, lora.LoraConfig(target_modules=["c_attn"]), key=jax.random.key(0))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return eqxlm.from_pretrained(save_hf(hf_model("llama"), tmp_path_factory.mktemp("llama")))


def _trained_peft(config, directory):
    """A PEFT adapter on the tiny Llama with A and B moved off their initial values (as
    training would), saved to `directory`; returns the PEFT model's logits."""
    ref = peft.get_peft_model(hf_model("llama"), config)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn_like(p, generator=torch.Generator().manual_seed(len(name))))
    ref.save_pretrained(directory)
    return run_hf(ref.eval(), IDS[None]).logits[0].numpy()


def test_every_field_of_peft_lora_config_is_used_ignored_with_a_reason_or_refused():
    known = set(lora.USED) | set(lora.NO_EFFECT) | set(lora.REFUSED) | {"init_lora_weights"}
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert fields <= known, f"peft.LoraConfig fields eqxlm does not classify: {sorted(fields - known)}"


@pytest.mark.parametrize(
    "options",
    [
        dict(init_lora_weights="gaussian"),
        dict(init_lora_weights="eva"),
        dict(init_lora_weights="orthogonal"),
        dict(init_lora_weights="mica"),
        dict(layers_to_transform=[1], layers_pattern="layers"),
        dict(exclude_modules=["model.layers.0.self_attn.q_proj"]),
        dict(fan_in_fan_out=True),  # PEFT resets it to False for nn.Linear
        dict(rank_pattern={"q_proj|down_proj": 2}, alpha_pattern={"k_proj|v_proj": 32, "down_proj": 3}),
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())[:40],
)
def test_peft_config_options_that_load_give_peft_logits(llama, tmp_path, options):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **options)
    _trained_peft(config, tmp_path)
    want = run_hf(peft.PeftModel.from_pretrained(hf_model("llama"), tmp_path).eval(), IDS[None]).logits[0].numpy()
    got = lora.load_adapter(llama, tmp_path)(jnp.asarray(IDS)).logits
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_adapters_trained_on_a_rewritten_base_are_refused_and_peft_conversion_loads(llama, tmp_path, init):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    ref = peft.get_peft_model(hf_model("llama"), config)
    ref.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter, for the conversion
    ref.save_pretrained(tmp_path / "initial")
    ref.peft_config["default"].init_lora_weights = init
    with torch.no_grad():
        for p in [p for name, p in ref.named_parameters() if "lora_" in name]:
            p.add_(0.3 * torch.randn_like(p))
    trained = run_hf(ref.eval(), IDS[None]).logits[0].numpy()
    ref.save_pretrained(tmp_path / "as_trained")
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}' rewrote the base weights.*conversion"):
        lora.load_adapter(llama, tmp_path / "as_trained")
    ref.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    got = lora.load_adapter(llama, tmp_path / "converted")(jnp.asarray(IDS)).logits
    np.testing.assert_allclose(got, trained, atol=1e-4)


def test_refused_fields_and_unknown_fields_are_named(llama, tmp_path):
    adapted = lora.add_adapters(llama, lora.LoraConfig(target_modules=["q_proj"]), key=jax.random.key(0))
    lora.save_adapter(adapted, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    on = {None: ["x"], False: True}
    for field, (off, _) in lora.REFUSED.items():
        value = on.get(off, "other")
        (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, field: value}))
        with pytest.raises(ValueError, match=re.escape(f"{field}={value!r}")):
            lora.load_adapter(llama, tmp_path)
    for init in ["pissa_niter_4", "corda", "loftq", "lora_ga", "something_new"]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, "init_lora_weights": init}))
        with pytest.raises(ValueError, match=f"init_lora_weights='{init}'"):
            lora.load_adapter(llama, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, "future_option": {"on": 1}}))
    with pytest.raises(ValueError, match="future_option=.*not known to eqxlm"):
        lora.load_adapter(llama, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, "future_option": None, "use_dora": False}))
    lora.load_adapter(llama, tmp_path)  # off: loads


def test_rank_and_alpha_patterns_survive_an_eqxlm_round_trip(llama, tmp_path):
    config = lora.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2, "layers.1.self_attn.v_proj": 6},
        alpha_pattern={"q_proj|v_proj": 3, "layers.0.mlp.down_proj": 32},
    )
    adapted = _random_b(lora.add_adapters(llama, config, key=jax.random.key(0)))
    lora.save_adapter(adapted, tmp_path)
    reloaded = lora.load_adapter(llama, tmp_path)
    ids = jnp.asarray(IDS)
    np.testing.assert_allclose(reloaded(ids).logits, adapted(ids).logits, atol=1e-6)
    saved = lora.read_config(tmp_path)
    before, after = lora._adapters(adapted), lora._adapters(reloaded)
    assert sorted(before) == sorted(after)
    for name, node in before.items():
        assert after[name].lora_A.shape == node.lora_A.shape == (config.rank_of(name), node.in_features), name
        assert after[name].scaling == pytest.approx(node.scaling, rel=1e-12), name
        assert (saved.rank_of(name), saved.alpha_of(name)) == pytest.approx((config.rank_of(name), config.alpha_of(name)))
    assert len({n.scaling for n in before.values()}) == 4 and len({n.lora_A.shape for n in before.values()}) == 3


def test_adapters_go_on_a_model_whose_layers_are_rematerialised(llama, tmp_path):
    config = lora.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    remat = _random_b(lora.add_adapters(training.remat_layers(llama), config, key=jax.random.key(0)))
    plain = _random_b(lora.add_adapters(llama, config, key=jax.random.key(0)))
    ids = jnp.asarray(IDS)
    np.testing.assert_allclose(remat(ids).logits, plain(ids).logits, atol=1e-6)
    lora.save_adapter(remat, tmp_path)
    np.testing.assert_allclose(lora.load_adapter(llama, tmp_path)(ids).logits, plain(ids).logits, atol=1e-6)


# -- adapter files get a checkpoint's checks (the one loading path, eqxlm.checkpoint.fill) --
def _saved_adapter(llama, directory):
    """An adapter on q_proj and v_proj (rank 4, B non-zero) saved to `directory`; its tensors."""
    config = lora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    lora.save_adapter(_random_b(lora.add_adapters(llama, config, key=jax.random.key(0))), directory)
    return load_file(directory / "adapter_model.safetensors")


LAYER = lora.PEFT_PREFIX + "model.layers."


def test_adapter_file_problems_are_all_named_at_once(llama, tmp_path):
    """A missing `lora_B` (its `lora_A` saved), a stray tensor and a misshapen `lora_A` are
    one `CheckpointError` naming the file and each, as a checkpoint's are."""
    tensors = _saved_adapter(llama, tmp_path)
    del tensors[f"{LAYER}0.self_attn.v_proj.lora_B.weight"]
    tensors[f"{LAYER}1.self_attn.k_proj.lora_C.weight"] = np.zeros((4, 32), np.float32)
    tensors[f"{LAYER}1.self_attn.q_proj.lora_A.weight"] = np.zeros((4, 31), np.float32)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(eqxlm.CheckpointError) as info:
        lora.load_adapter(llama, tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: adapter_model.safetensors does not match"), message
    for line in (
        f"missing tensors: {LAYER}0.self_attn.v_proj.lora_B.weight",
        f"unexpected tensors: adapter_model.safetensors: {LAYER}1.self_attn.k_proj.lora_C.weight",
        f"misshapen tensors: adapter_model.safetensors: {LAYER}1.self_attn.q_proj.lora_A.weight: file (4, 31), model (4, 32)",
    ):
        assert line in message, message
    assert len(message.splitlines()) == 4


def test_adapter_tensor_of_an_integer_dtype_is_refused_by_name(llama, tmp_path):
    tensors = _saved_adapter(llama, tmp_path)
    name = f"{LAYER}1.self_attn.v_proj.lora_B.weight"
    tensors[name] = tensors[name].astype(np.int32)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(
        eqxlm.CheckpointError, match=rf"adapter_model\.safetensors: {re.escape(name)}: stored as I32, expected a float"
    ):
        lora.load_adapter(llama, tmp_path)


def test_truncated_adapter_file_names_the_file(llama, tmp_path):
    _saved_adapter(llama, tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(eqxlm.CheckpointError, match=rf"{re.escape(str(file))}: tensor .*truncated"):
        lora.load_adapter(llama, tmp_path)


def test_bfloat16_adapter_file_loads_as_torch_upcasts_it(llama, tmp_path):
    """A bfloat16 adapter (PEFT saves a bfloat16 model's adapter so) on a float32 model: the
    adapters hold torch's float32 of the file's values, bit for bit."""
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    _saved_adapter(llama, tmp_path / "f32")
    (tmp_path / "bf16").mkdir()
    (tmp_path / "bf16" / "adapter_config.json").write_text((tmp_path / "f32" / "adapter_config.json").read_text())
    stored = {k: v.to(torch.bfloat16) for k, v in load_torch(tmp_path / "f32" / "adapter_model.safetensors").items()}
    save_torch(stored, tmp_path / "bf16" / "adapter_model.safetensors")
    lora.save_adapter(lora.load_adapter(llama, tmp_path / "bf16"), tmp_path / "again")
    again = load_torch(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(again) == sorted(stored)
    for name, value in stored.items():
        assert again[name].dtype == torch.float32 and torch.equal(again[name], value.float()), name


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
