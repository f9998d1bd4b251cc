"""Import/export: lossless round trips, shards, the hub cache offline, dtypes, and errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import LOGITS_ATOL
from hf import hf_model, run_hf, save_hf, tiny_mistral
from safetensors.numpy import load_file, save_file

import eqxlm
from eqxlm import CheckpointError, ConfigError


@pytest.fixture(scope="module", params=["llama", "mistral", "bloom"])
def saved(request, tmp_path_factory):
    overrides = {"sliding_window": 4} if request.param == "mistral" else {}
    ref = hf_model(request.param, **overrides)
    return request.param, ref, save_hf(ref, tmp_path_factory.mktemp(f"hf-{request.param}"))


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_import_then_export_is_bitwise_identical(saved, tmp_path):
    kind, _, path = saved
    model = eqxlm.from_pretrained(path)
    eqxlm.save_pretrained(model, tmp_path / "out")
    before, after = _tensors(Path(path)), _tensors(tmp_path / "out")
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and np.array_equal(before[name], after[name]), name
    config_in = json.loads((Path(path) / "config.json").read_text())
    config_out = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "tie_word_embeddings", "model_type", "architectures"):
        assert config_in[key] == config_out[key]


def test_transformers_loads_what_eqxlm_saves(saved, tmp_path):
    kind, ref, path = saved
    model = eqxlm.from_pretrained(path)
    eqxlm.save_pretrained(model, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(reloaded) is type(ref)
    ids = np.random.default_rng(0).integers(0, 96, size=(1, 10))
    np.testing.assert_array_equal(run_hf(reloaded, ids).logits.numpy(), run_hf(ref, ids).logits.numpy())
    assert reloaded.config.to_diff_dict().get("sliding_window") == ref.config.to_diff_dict().get("sliding_window")


def test_export_of_a_random_model_round_trips_through_transformers(tmp_path):
    config = eqxlm.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_scaling=eqxlm.nn.LinearScaling(2.0),
    )
    model = eqxlm.DecoderLM(config, key=jax.random.key(3))
    eqxlm.save_pretrained(model, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = np.arange(12)[None] % 64
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(ids[0], jnp.int32)).logits), run_hf(ref, ids).logits[0].numpy(), atol=1e-4, rtol=0
    )
    again = eqxlm.from_pretrained(tmp_path)
    assert again.config == model.config
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(again), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_sharded_save_and_load(saved, tmp_path):
    kind, ref, path = saved
    model = eqxlm.from_pretrained(path)
    out = eqxlm.save_pretrained(model, tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in _tensors(out).values())
    again = eqxlm.from_pretrained(out)
    ids = jnp.arange(8, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(again(ids).logits), np.asarray(model(ids).logits))
    hf_sharded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    np.testing.assert_array_equal(
        run_hf(hf_sharded, np.arange(8)[None]).logits.numpy(), run_hf(ref, np.arange(8)[None]).logits.numpy()
    )


def test_bfloat16_loading(saved):
    """Parameters really are bfloat16; logits stay within 0.15 of float32's (max abs over
    a 16-token sequence, logits of magnitude ~5) and agree on the argmax at most positions."""
    kind, _, path = saved
    f32 = eqxlm.from_pretrained(path)
    bf16 = eqxlm.from_pretrained(path, dtype=jnp.bfloat16)
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(bf16)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 96, 16), jnp.int32)
    a, b = np.asarray(f32(ids).logits), np.asarray(bf16(ids).logits.astype(jnp.float32))
    assert np.abs(a - b).max() < 0.15
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.8


def test_bloom_without_transformer_prefix(tmp_path):
    ref = hf_model("bloom")
    path = save_hf(ref, tmp_path / "with")
    tensors = load_file(f"{path}/model.safetensors")
    (tmp_path / "without").mkdir()
    save_file(
        {k.removeprefix("transformer."): v for k, v in tensors.items()},
        tmp_path / "without" / "model.safetensors",
        metadata={"format": "pt"},
    )
    shutil.copy(f"{path}/config.json", tmp_path / "without")
    a, b = eqxlm.from_pretrained(path), eqxlm.from_pretrained(tmp_path / "without")
    ids = jnp.arange(7, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(a(ids).logits), np.asarray(b(ids).logits))


def _hub_layout(root, repo_id, src, commit="0123456789abcdef0123456789abcdef01234567"):
    """A huggingface_hub cache entry: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in Path(src).iterdir():
        shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return commit


def test_load_by_repo_id_from_hub_cache_offline(saved, tmp_path):
    kind, _, path = saved
    commit = _hub_layout(tmp_path, f"tiny-org/tiny-{kind}", path)
    code = (
        "import jax.numpy as jnp, eqxlm, sys\n"
        f"m = eqxlm.from_pretrained('tiny-org/tiny-{kind}')\n"
        f"r = eqxlm.from_pretrained('tiny-org/tiny-{kind}', revision='{commit}')\n"
        "print(m.config.architecture, float(m(jnp.arange(4, dtype=jnp.int32)).logits.sum()) == "
        "float(r(jnp.arange(4, dtype=jnp.int32)).logits.sum()))\n"
        "try:\n    eqxlm.from_pretrained('tiny-org/not-cached')\nexcept FileNotFoundError as e:\n    print('MISSING', e)\n"
    )
    env = {
        "HF_HUB_CACHE": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    cls = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "bloom": "BloomForCausalLM"}[kind]
    assert f"{cls} True" in out.stdout
    assert "MISSING tiny-org/not-cached" in out.stdout


# -- bad checkpoints ---------------------------------------------------------------------
@pytest.fixture
def llama_dir(tmp_path):
    return Path(save_hf(hf_model("llama"), tmp_path / "llama"))


def test_missing_unexpected_and_misshapen_are_all_named(llama_dir):
    tensors = load_file(llama_dir / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    del tensors["model.norm.weight"]
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
    tensors["model.layers.1.self_attn.q_proj.weight"] = np.zeros((5, 32), np.float32)
    save_file(tensors, llama_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        eqxlm.from_pretrained(llama_dir)
    message = str(info.value)
    for name in (
        "model.layers.0.mlp.up_proj.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.extra.weight",
        "model.layers.1.self_attn.q_proj.weight: file (5, 32), model (32, 32)",
    ):
        assert name in message


def test_stray_tensor_ending_like_the_tied_head_is_refused_by_name(tmp_path):
    """A tied checkpoint may carry `lm_head.weight` (a copy of the embedding), which is
    skipped; a tensor that merely ends like it is not the head and is refused by name."""
    path = Path(save_hf(hf_model("llama", tie_word_embeddings=True), tmp_path / "tied"))
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    eqxlm.from_pretrained(path)  # the head saved anyway loads
    tensors["model.extra.lm_head.weight"] = np.zeros((96, 32), np.float32)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.safetensors: model\.extra\.lm_head\.weight"):
        eqxlm.from_pretrained(path)


def test_save_refuses_tensors_its_family_does_not_build(tmp_path):
    """`save_pretrained` writes the config's `model_type`; tensors that family does not build
    would make a folder `from_pretrained` refuses, so saving refuses first, names the tensors and
    says what to do. Nothing is written."""
    import equinox as eqx

    from eqxlm import lora, quantization

    model = tiny_mistral()
    # a part replaced with eqx.tree_at: an MLP with biases is not a Mistral's
    biased = eqxlm.nn.GatedMLP(32, 48, use_bias=True, key=jax.random.key(1))
    changed = eqx.tree_at(lambda m: m.model.layers[1].mlp, model, biased)
    with pytest.raises(CheckpointError) as info:
        eqxlm.save_pretrained(changed, tmp_path / "changed")
    message = str(info.value)
    assert "not in a mistral: model.layers.1.mlp.down_proj.bias" in message and "own model_type" in message
    assert len(message) < 800 and not (tmp_path / "changed").exists()
    # the same names, another size
    wider = eqx.tree_at(lambda m: m.model.layers[0].mlp, model, eqxlm.nn.GatedMLP(32, 64, key=jax.random.key(1)))
    with pytest.raises(
        CheckpointError, match=r"misshapen: model\.layers\.0\.mlp\.down_proj\.weight: model \(32, 64\), mistral \(32, 48\)"
    ):
        eqxlm.save_pretrained(wider, tmp_path / "x")
    # a head dropped by hand where the config says untied
    with pytest.raises(CheckpointError, match=r"missing: lm_head\.weight"):
        eqxlm.save_pretrained(eqx.tree_at(lambda m: m.lm_head, model, None, is_leaf=lambda x: x is None), tmp_path / "x")
    # adapters not merged; quantized projections
    adapted = lora.add_adapters(model, lora.LoraConfig(r=2, target_modules=["q_proj"]), key=jax.random.key(2))
    with pytest.raises(CheckpointError, match=r"lora_A.*merge_and_unload"):
        eqxlm.save_pretrained(adapted, tmp_path / "x")
    with pytest.raises(CheckpointError, match=r"qweight.*save_quantized"):
        eqxlm.save_pretrained(quantization.quantize(model), tmp_path / "x")
    # what the family builds saves: merged adapters, scanned layers, bfloat16, a tied head
    for name, ok in [
        ("merged", lora.merge_and_unload(adapted)),
        ("scanned", eqxlm.scan_layers(model)),
        ("bf16", jax.tree.map(lambda x: x.astype(jnp.bfloat16) if eqx.is_array(x) else x, model)),
        ("tied", tiny_mistral(tie_word_embeddings=True)),
    ]:
        again = eqxlm.hf_state_dict(eqxlm.from_pretrained(eqxlm.save_pretrained(ok, tmp_path / name)))
        for key, value in eqxlm.hf_state_dict(ok).items():
            assert again[key].dtype == value.dtype and np.array_equal(again[key], value), (name, key)


def test_phi3_longrope_as_hub_checkpoints_write_it(tmp_path):
    """Phi-3 checkpoints keep `original_max_position_embeddings` at the top level, longrope in
    transformers 4's `rope_scaling` (`type`, no `rope_theta`); transformers reads the length
    there. eqxlm loads it, matches transformers' logits on both sides of the switch point, and
    writes it back where transformers reads it (top level and `rope_parameters`)."""
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0, 1.5, 2.0, 3.0],
        "long_factor": [2.0, 3.0, 5.0, 9.0],
    }
    ref = hf_model("phi3", original_max_position_embeddings=8, rope_parameters=rope)
    path = Path(save_hf(ref, tmp_path / "hf"))
    config = json.loads((path / "config.json").read_text())
    del config["rope_parameters"]
    config.update(
        rope_theta=10000.0,
        rope_scaling={"type": "longrope", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]},
    )
    assert config["original_max_position_embeddings"] == 8
    (path / "config.json").write_text(json.dumps(config))
    read = transformers.AutoConfig.from_pretrained(path).rope_parameters
    assert {k: v for k, v in read.items() if k != "type"} == ref.config.rope_parameters
    model = eqxlm.from_pretrained(path)
    rng = np.random.default_rng(0)
    for n in (6, 12):  # short_factor, then long_factor (past 8 positions)
        ids = rng.integers(0, 96, size=(1, n))
        got = np.asarray(jax.vmap(model)(jnp.asarray(ids)).logits)
        np.testing.assert_allclose(got, run_hf(ref, ids).logits.numpy(), atol=LOGITS_ATOL, rtol=0)
    out = eqxlm.save_pretrained(model, tmp_path / "out")
    written = json.loads((out / "config.json").read_text())
    assert written["original_max_position_embeddings"] == 8 == written["rope_parameters"]["original_max_position_embeddings"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert reloaded.config.rope_parameters == ref.config.rope_parameters
    np.testing.assert_array_equal(run_hf(reloaded, ids).logits.numpy(), run_hf(ref, ids).logits.numpy())


def test_longrope_without_original_length_takes_max_position_embeddings(tmp_path):
    """A longrope `rope_parameters` without `original_max_position_embeddings`: transformers
    takes `max_position_embeddings`, and so does eqxlm (it used to refuse the config as missing
    the field). The same field at the top level is not read by transformers' Llama (only Phi-3
    reads it there): refused by its name, not reported missing."""
    rope = {
        "rope_type": "longrope",
        "rope_theta": 1e4,
        "factor": 2.0,
        "short_factor": [1.0, 1.5, 2.0, 3.0],
        "long_factor": [2.0] * 4,
    }
    ref = hf_model("llama", max_position_embeddings=12, rope_parameters=rope)
    path = Path(save_hf(ref, tmp_path / "hf"))
    config = json.loads((path / "config.json").read_text())
    del config["rope_parameters"]["original_max_position_embeddings"]
    (path / "config.json").write_text(json.dumps(config))
    assert transformers.AutoConfig.from_pretrained(path).rope_parameters["original_max_position_embeddings"] == 12
    model = eqxlm.from_pretrained(path)
    ids = np.random.default_rng(0).integers(0, 96, size=(1, 10))
    got = np.asarray(jax.vmap(model)(jnp.asarray(ids)).logits)
    np.testing.assert_allclose(got, run_hf(ref, ids).logits.numpy(), atol=LOGITS_ATOL, rtol=0)
    config["original_max_position_embeddings"] = 6
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="unsupported config field.*: original_max_position_embeddings"):
        eqxlm.from_pretrained(path)


def test_pytorch_bin_only_folder_says_safetensors_needed(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    torch.save({}, llama_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors"):
        eqxlm.from_pretrained(llama_dir)


def test_missing_shard_is_named(llama_dir, tmp_path):
    out = eqxlm.save_pretrained(eqxlm.from_pretrained(llama_dir), tmp_path / "s", max_shard_size=10_000)
    victim = sorted(out.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        eqxlm.from_pretrained(out)


@pytest.mark.parametrize(
    "field,value,kind",
    [
        ("quantization_config", {"quant_method": "gptq"}, "llama"),
        ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "llama"),
        ("hidden_act", "xielu", "llama"),
        ("hidden_activation", "prelu", "gemma2"),
        ("activation_function", "no_such_activation", "gpt2"),
        ("slow_but_exact", True, "bloom"),
        ("attention_bias", True, "mistral"),
        ("some_new_field", 1, "mistral"),
    ],
)
def test_unsupported_config_fields_are_refused_by_name(field, value, kind, tmp_path):
    path = Path(save_hf(hf_model(kind), tmp_path / kind))
    config = json.loads((path / "config.json").read_text())
    config[field] = value
    if field == "slow_but_exact":
        config["pretraining_tp"] = 2
    if field == "rope_scaling":
        config.pop("rope_parameters", None)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=field if field != "rope_scaling" else "dynamic"):
        eqxlm.from_pretrained(path)


def test_unknown_model_type_and_missing_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not_a_family"}))
    with pytest.raises(CheckpointError, match="not_a_family"):
        eqxlm.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        eqxlm.from_pretrained(tmp_path / "nope")


def test_ignored_fields_survive_export(llama_dir, tmp_path):
    config = json.loads((llama_dir / "config.json").read_text())
    config["pretraining_tp"] = 4  # ignored by transformers 5's Llama too
    config["_name_or_path"] = "somewhere"
    (llama_dir / "config.json").write_text(json.dumps(config))
    out = eqxlm.save_pretrained(eqxlm.from_pretrained(llama_dir), tmp_path / "o")
    written = json.loads((out / "config.json").read_text())
    assert written["pretraining_tp"] == 4 and written["_name_or_path"] == "somewhere"


def test_chunked_reads_of_large_tensors_are_bitwise_identical(saved, monkeypatch):
    """Tensors above CHUNK_BYTES are read and placed in row chunks; force that path."""
    import eqxlm.checkpoint

    kind, _, path = saved
    whole = eqxlm.from_pretrained(path)
    monkeypatch.setattr(eqxlm.checkpoint, "CHUNK_BYTES", 1000)
    chunked = eqxlm.from_pretrained(path, dtype=jnp.bfloat16)
    reference = eqxlm.from_pretrained(path)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(reference), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked), strict=True):
        assert np.array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))
