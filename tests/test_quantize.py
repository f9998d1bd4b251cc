"""Weight-only quantization (`eqxlm.quantize`): the layer against its definition, tiny
Llama and Mixtral models against their float selves, scanned layers, save/load, refusals.
Quick (default suite): the rounding and the int4 groups against a numpy reference, exactly.

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


def slow(test):
    """Marks a test slow (eager forwards of the tiny models, a Mixtral generate), run in CI's
    second step."""
    return pytest.mark.ci(pytest.mark.slow(test))


BOUND = {8: 0.02, 4: 0.15}
GROUP = {8: None, 4: 8}


def _dequantize_numpy(layer: QuantizedLinear) -> np.ndarray:
    """The definition: W[o, i] = scales[o, i // group_size] * Q[o, i], in float64."""
    q = np.asarray(layer.qweight).astype(np.float64)
    s = np.asarray(layer.scales).astype(np.float64)
    return q * np.repeat(s, layer.group_size, axis=1)


@slow
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


@slow
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


@slow
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


@slow
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


@slow
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


# -- quick: rounding and int4 groups, exactly ------------------------------------------------
def _reference(w: np.ndarray, bits: int, group: int, scales: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax in numpy, float32 op for op as the definition reads: per group
    `s = max|W| / qmax` (1 for an all-zero group), `Q = clip(round(W / s), -qmax, qmax)`,
    rounding to nearest with ties to even (`np.round`); `Q` from the given `scales` if any."""
    qmax = np.float32(2 ** (bits - 1) - 1)
    out, n_in = w.shape
    grouped = w.astype(np.float32).reshape(out, n_in // group, group)
    absmax = np.abs(grouped).max(-1)
    if scales is None:
        scales = np.where(absmax > 0, absmax / qmax, np.float32(1)).astype(np.float32)
    q = np.clip(np.round(grouped / scales[..., None]), -qmax, qmax)
    return q.astype(np.int8).reshape(out, n_in), scales


# Half-way values (exact in float32 with the power-of-two scales below), each group led by its
# absmax: ties go to the even neighbour, so the rounding mode shows. int4 groups of 8; int8's
# one group of 64 holds them all.
HALVES4 = [7, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 6.5, -7, 3.5, -3.5, 4.5, -4.5, 5.5, -5.5, -6.5]
EVEN4 = [7, 0, 2, 2, 0, -2, -2, 6, -7, 4, -4, 4, -4, 6, -6, -6]
HALVES8 = [127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.5, -3.5, 63.5, -64.5, 100.5, -101.5]
EVEN8 = [127, 0, 2, 2, 0, -2, -2, 126, -126, 4, -4, 64, -64, 100, -102]


def _quick_weight(bits: int) -> np.ndarray:
    """`(6, 64)`: half-way values (int4: each group of 8 at its own power-of-two scale, so
    contiguous groups and any other grouping get different scales), random rows whose groups
    differ in magnitude by up to 2 ** 7, a row whose largest magnitude is negative, zeros."""
    rng = np.random.default_rng(3)
    w = np.zeros((6, 64), np.float32)
    if bits == 4:
        w[0] = np.tile(HALVES4, 4) * np.repeat(2.0 ** -np.arange(8), 8)
    else:
        w[0, : len(HALVES8)] = np.asarray(HALVES8) * 2.0**-3
    w[1:4] = rng.standard_normal((3, 64)) * np.repeat(2.0 ** rng.integers(-3, 5, (3, 8)), 8, axis=1)
    w[4] = rng.uniform(-1, 1, 64)
    w[4, 37] = -3.0
    return w  # row 5: zeros


@pytest.mark.parametrize("bits", [8, 4])
def test_rounding_and_groups_match_numpy_exactly(bits):
    group = 64 if bits == 8 else 8  # int4: 8 groups of 8, so rows x groups is square: a transposed grouping keeps shapes
    w = _quick_weight(bits)
    linear = eqx.tree_at(lambda m: m.weight, eqx.nn.Linear(64, 6, use_bias=False, key=jax.random.key(0)), jnp.asarray(w))
    layer = QuantizedLinear.from_linear(linear, bits, None if bits == 8 else group)
    q, scales = np.asarray(layer.qweight), np.asarray(layer.scales)
    # XLA turns the division by the constant qmax into a product with its float32 reciprocal,
    # which can be one float32 ulp off the quotient (measured: 55% of values for qmax 7): the
    # scales are checked to that ulp, and the rounding exactly on the layer's own scales
    np.testing.assert_allclose(scales, _reference(w, bits, group)[1], rtol=2.0**-23, atol=0)
    want_q, want_scales = _reference(w, bits, group, scales)
    np.testing.assert_array_equal(q, want_q)
    halves, even = (HALVES4 * 4, EVEN4 * 4) if bits == 4 else (HALVES8, EVEN8)
    np.testing.assert_array_equal(q[0, : len(even)], even)  # ties to even, by hand
    qmax = 2 ** (bits - 1) - 1
    # every group's largest magnitude lands on +-qmax, with its sign; nothing beyond
    at = np.abs(w.reshape(6, -1, group)).argmax(-1)[..., None]
    largest = np.take_along_axis(w.reshape(6, -1, group), at, -1)[:5]
    np.testing.assert_array_equal(np.take_along_axis(q.reshape(6, -1, group), at, -1)[:5], np.sign(largest) * qmax)
    assert q[4, 37] == -qmax and np.abs(q).max() == qmax and not q[5].any() and np.all(scales[5] == 1)
    # the layer computes with these: dequantized weight exactly, and each path of the product
    dequantized = want_q.astype(np.float32) * np.repeat(want_scales, group, axis=1)
    np.testing.assert_array_equal(np.asarray(layer.dequantize()), dequantized)
    x = np.random.default_rng(4).standard_normal((8, 64)).astype(np.float32)
    want = x.astype(np.float64) @ dequantized.T.astype(np.float64)
    tol = dict(rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(layer(jnp.asarray(x[0])), want[0], **tol)  # one token: the fused reduce
    np.testing.assert_allclose(jax.vmap(layer)(jnp.asarray(x[:3])), want[:3], **tol)  # up to SMALL_BATCH rows: per row
    np.testing.assert_allclose(jax.vmap(layer)(jnp.asarray(x)), want, **tol)  # more: dequantize once


def test_int4_group_size_must_divide_in_features():
    """Groups are whole: a group size that does not divide `in_features` is refused, naming the
    layer, not quantized with a short last group."""
    linear = eqx.nn.Linear(60, 6, key=jax.random.key(0))
    with pytest.raises(ValueError, match="in_features 60 is not a multiple of group_size 8"):
        QuantizedLinear.from_linear(linear, 4, 8)
    mlp = eqx.nn.MLP(64, 6, 60, 1, key=jax.random.key(0))  # layers: 64 -> 60 -> 6
    with pytest.raises(ValueError, match=r"group_size 8 does not divide in_features of layers\.1"):
        eqxlm.quantize(mlp, bits=4, group_size=8)
    quantized = eqxlm.quantize(mlp, bits=4, group_size=4)  # 4 divides both
    assert [q.scales.shape for q in quantized_layers(quantized).values()] == [(60, 16), (6, 15)]


# -- quick: a quantized folder gets a checkpoint's checks (eqxlm.checkpoint.fill) ------------
def test_quantized_folder_gets_the_checks_of_a_checkpoint(tmp_path, monkeypatch):
    """`load_quantized` fills its skeleton as `from_pretrained` does: tensors in another dtype
    are named by file with both dtypes (int4 is packed as U8), and a model that cannot fit
    is refused before anything is read."""
    from safetensors.numpy import load_file, save_file

    eqxlm.save_quantized(eqxlm.quantize(_model("llama"), bits=4, group_size=8), tmp_path)
    file = tmp_path / "quantized.safetensors"
    tensors = load_file(file)
    original = dict(tensors)
    scales, qweight = "model.layers.1.self_attn.o_proj.scales", "model.layers.0.mlp.up_proj.qweight"
    tensors[scales] = tensors[scales].astype(np.float16)
    tensors[qweight] = tensors[qweight].view(np.int8)
    save_file(tensors, file, metadata={"format": "eqxlm-weight-only/1"})
    with pytest.raises(eqxlm.CheckpointError) as info:
        eqxlm.load_quantized(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: quantized.safetensors does not match config.json and quantization.json"), message
    assert f"quantized.safetensors: {qweight}: stored as I8, expected U8" in message, message
    assert f"quantized.safetensors: {scales}: stored as F16, expected F32" in message, message
    assert len(message.splitlines()) == 2
    save_file(original, file, metadata={"format": "eqxlm-weight-only/1"})
    monkeypatch.setattr(eqxlm._memory, "available_memory", lambda device=None: (1000, "MemAvailable in /proc/meminfo"))
    monkeypatch.setattr(eqxlm._safetensors.SafetensorsFile, "read", lambda *a, **k: pytest.fail("read before the check"))
    with pytest.raises(MemoryError, match=rf"{tmp_path}: its weights need 0\.00 GiB, but only 0\.00 GiB"):
        eqxlm.load_quantized(tmp_path)
