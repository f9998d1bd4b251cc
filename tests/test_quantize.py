"""Weight-only quantization (`eqxlm.quantize`): the layer against its definition, tiny
Llama and Mixtral models against their float selves, scanned layers, save/load, refusals.

Bound on the models: the quantized model's logits stay within `bound * max|float logits|`
of the float model's, with bound 0.02 for int8 and 0.15 for int4 (group 8); measured on these
seeds: 0.4% and 6% (tiny random models with 0.2-std weights quantize worse than trained ones).
"""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf import TINY

import eqxlm
from eqxlm.quantization import QuantizedLinear, quantized_layers

# 73 s on 2 cores (eager forwards of the tiny models, a Mixtral generate): in CI's second step
pytestmark = [pytest.mark.slow, pytest.mark.ci]

BOUND = {8: 0.02, 4: 0.15}
GROUP = {8: None, 4: 8}


def _dequantize_numpy(layer: QuantizedLinear) -> np.ndarray:
    """The definition: W[o, i] = scales[o, i // group_size] * Q[o, i], in float64."""
    q = np.asarray(layer.qweight).astype(np.float64)
    s = np.asarray(layer.scales).astype(np.float64)
    return q * np.repeat(s, layer.group_size, axis=1)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("use_bias", [False, True])
def test_linear_matches_definition(bits, use_bias):
    linear = eqx.nn.Linear(64, 24, use_bias=use_bias, key=jax.random.key(0))
    layer = QuantizedLinear.from_linear(linear, bits, GROUP[bits])
    w = np.asarray(linear.weight, np.float64)
    q = np.asarray(layer.qweight)
    assert layer.qweight.dtype == jnp.int8 and q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1
    assert layer.scales.shape == (24, 1 if bits == 8 else 64 // GROUP[bits])
    # the rounding error is at most half a step
    assert np.all(np.abs(_dequantize_numpy(layer) - w) <= 0.5 * np.repeat(np.asarray(layer.scales), layer.group_size, 1) + 1e-7)
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    want = x.astype(np.float64) @ _dequantize_numpy(layer).T
    if use_bias:
        want = want + np.asarray(linear.bias, np.float64)
    np.testing.assert_allclose(np.stack([layer(jnp.asarray(r)) for r in x]), want, rtol=1e-6, atol=1e-6)  # one token
    np.testing.assert_allclose(jax.vmap(layer)(jnp.asarray(x)), want, rtol=1e-6, atol=1e-6)  # few rows: fused reduces
    many = np.tile(x, (4, 1))  # above SMALL_BATCH: dequantize once, one matrix product
    np.testing.assert_allclose(jax.vmap(layer)(jnp.asarray(many)), np.tile(want, (4, 1)), rtol=1e-6, atol=1e-6)
    nested = jax.vmap(jax.vmap(layer))(jnp.asarray(many.reshape(4, 5, 64)))
    np.testing.assert_allclose(nested.reshape(20, 24), np.tile(want, (4, 1)), rtol=1e-6, atol=1e-6)


def _model(kind: str, scanned: bool = False):
    config = eqxlm.models.lookup(kind)[0](**TINY[kind])
    model = eqxlm.DecoderLM(config, key=jax.random.key(0))
    return eqxlm.scan_layers(model) if scanned else model


@pytest.fixture(scope="module")
def models():
    return {kind: _model(kind) for kind in ("llama", "mixtral")}


IDS = np.arange(3, 15, dtype=np.int32)


@pytest.mark.parametrize("kind, bits", [("llama", 8), ("mixtral", 4), ("mixtral", 8)])
def test_model_within_bound(models, kind, bits):
    model = models[kind]
    qmodel = eqxlm.quantize(model, bits=bits, group_size=GROUP[bits])
    names = quantized_layers(qmodel)
    assert "lm_head" not in names and not any(n.endswith(".gate") for n in names)
    assert "model.layers.1.self_attn.o_proj" in names
    assert ("model.layers.0.mlp.experts.3.down_proj" in names) == (kind == "mixtral")
    ref, got = model(IDS).logits, qmodel(IDS).logits
    assert float(jnp.max(jnp.abs(got - ref))) <= BOUND[bits] * float(jnp.max(jnp.abs(ref)))
    assert not jnp.array_equal(got, ref)
    # scanned layers: the same numbers as unrolled (up to float32 summation order)
    scanned = eqxlm.quantize(eqxlm.scan_layers(model), bits=bits, group_size=GROUP[bits])
    np.testing.assert_allclose(scanned(IDS).logits, got, atol=1e-5)


@pytest.mark.parametrize("kind, bits", [("llama", 8), ("mixtral", 4)])
def test_generate(models, kind, bits):
    """`eqxlm.generate` (a jax.vmap over the batch, scanned layers): each greedy token is the
    argmax of the quantized model's own full forward over the tokens before it."""
    qmodel = eqxlm.quantize(eqxlm.scan_layers(models[kind]), bits=bits, group_size=GROUP[bits])
    prompts = np.stack([IDS, IDS[::-1]])
    out = np.asarray(eqxlm.generate(qmodel, prompts, max_new_tokens=3, eos_token_id=[]))
    forward = eqx.filter_jit(lambda m, ids: m(ids).logits)
    for row in out:
        logits = forward(qmodel, jnp.asarray(row[:-1]))
        np.testing.assert_array_equal(np.argmax(logits[len(IDS) - 1 :], axis=-1), row[len(IDS) :])


def test_save_load_roundtrip_bitwise(models, tmp_path):
    """int4 (packed in the file) of scanned Mixtral layers and experts; int8 in test_refusals."""
    bits = 4
    qmodel = eqxlm.quantize(eqxlm.scan_layers(models["mixtral"]), bits=bits, group_size=GROUP[bits])
    eqxlm.save_quantized(qmodel, tmp_path)
    meta = json.loads((tmp_path / "quantization.json").read_text())
    assert meta["bits"] == bits and meta["group_size"] == GROUP[bits]
    scanned = eqxlm.load_quantized(tmp_path, scan_layers=True)
    for a, b in zip(jax.tree.leaves(qmodel), jax.tree.leaves(scanned), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    unrolled = eqxlm.load_quantized(tmp_path)  # the file is per layer: loads in either layout
    assert jnp.array_equal(eqxlm.scan_layers(unrolled)(IDS).logits, qmodel(IDS).logits)


def test_refusals(models, tmp_path):
    model = models["llama"]
    with pytest.raises(ValueError, match="bits must be 8 or 4, got 3"):
        eqxlm.quantize(model, bits=3)
    with pytest.raises(ValueError, match="group_size is for bits=4"):
        eqxlm.quantize(model, bits=8, group_size=64)
    with pytest.raises(ValueError, match=r"group_size 16 does not divide in_features of model\.layers\.0\.mlp\.down_proj"):
        eqxlm.quantize(model, bits=4, group_size=16)  # intermediate 56
    with pytest.raises(ValueError, match="selects no linear layer"):
        eqxlm.quantize(model, where=lambda name: False)
    with pytest.raises(ValueError, match="some but not all of the stacked layers"):
        eqxlm.quantize(eqxlm.scan_layers(model), where=lambda name: name.startswith("model.layers.0."))
    # a file that does not match: another model's weights under the same quantization.json
    qmodel = eqxlm.quantize(model, bits=8)
    eqxlm.save_quantized(qmodel, tmp_path / "a")
    loaded = eqxlm.load_quantized(tmp_path / "a")  # int8 round trip, bit for bit
    for a, b in zip(jax.tree.leaves(qmodel), jax.tree.leaves(loaded), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    wider = eqxlm.DecoderLM(eqxlm.LlamaConfig(**{**TINY["llama"], "intermediate_size": 64}), key=jax.random.key(0))
    eqxlm.save_quantized(eqxlm.quantize(wider, bits=8), tmp_path / "b")
    (tmp_path / "b" / "quantized.safetensors").replace(tmp_path / "a" / "quantized.safetensors")
    with pytest.raises(
        eqxlm.CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.qweight: file int8 \(64, 32\), model int8 \(56, 32\)"
    ):
        eqxlm.load_quantized(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "quantization.json").read_text())
    (tmp_path / "a" / "quantization.json").write_text(json.dumps({**meta, "bits": 5}))
    with pytest.raises(eqxlm.CheckpointError, match="quantization.json: bits must be 8 or 4, got 5"):
        eqxlm.load_quantized(tmp_path / "a")
