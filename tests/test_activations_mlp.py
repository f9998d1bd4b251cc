import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import PART_ATOL
from hf import copy_from_torch, hf_config
from transformers.activations import ACT2FN
from transformers.models.bloom.modeling_bloom import BloomMLP as TorchBloomMLP
from transformers.models.bloom.modeling_bloom import bloom_gelu_forward
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mistral.modeling_mistral import MistralMLP

from eqxlm.nn import ACTIVATIONS, MLP, GatedMLP, bloom_gelu
from eqxlm.params import KeyMap


def test_bloom_gelu_matches_hf():
    x = np.linspace(-8, 8, 2001, dtype=np.float32)
    np.testing.assert_allclose(
        np.asarray(bloom_gelu(jnp.asarray(x))), bloom_gelu_forward(torch.tensor(x)).numpy(), atol=PART_ATOL, rtol=0
    )


def test_bloom_gelu_differs_from_jax_gelu_constant():
    """The literal 0.79788456 is not sqrt(2/pi): jax.nn.gelu would not match BLOOM exactly."""
    x = jnp.linspace(-8, 8, 2001)
    assert not np.array_equal(np.asarray(bloom_gelu(x)), np.asarray(jax.nn.gelu(x, approximate=True)))


def test_gated_mlp_matches_llama_and_mistral():
    x = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    for cls, bias in ((LlamaMLP, True), (LlamaMLP, False), (MistralMLP, False)):
        torch.manual_seed(0)
        ref = cls(hf_config("llama", mlp_bias=bias))
        ours = copy_from_torch(GatedMLP(32, 56, use_bias=bias, key=jax.random.key(0)), ref)
        want = ref(torch.tensor(x)).detach().numpy()
        np.testing.assert_allclose(np.asarray(jax.vmap(ours)(jnp.asarray(x))), want, atol=PART_ATOL, rtol=0)


def test_bloom_mlp_matches_hf():
    x = np.random.default_rng(1).normal(size=(5, 32)).astype(np.float32)
    torch.manual_seed(0)
    ref = TorchBloomMLP(hf_config("bloom"))
    bloom_names = KeyMap(renames=((r"^up_proj", "dense_h_to_4h"), (r"^down_proj", "dense_4h_to_h")))
    ours = copy_from_torch(MLP(32, 128, activation=bloom_gelu, key=jax.random.key(0)), ref, key_map=bloom_names)
    want = ref(torch.tensor(x), torch.zeros(5, 32)).detach().numpy()  # HF adds the residual inside
    np.testing.assert_allclose(np.asarray(jax.vmap(ours)(jnp.asarray(x))), want, atol=PART_ATOL, rtol=0)


# -- every activation transformers names ------------------------------------------------------
#: Inputs across the range a checkpoint's MLP sees and far past it: softplus's threshold (20),
#: exp's float32 overflow (88) and large magnitudes of both signs.
WIDE = np.concatenate(
    [np.linspace(-12, 12, 2401), np.geomspace(12, 3e4, 300), -np.geomspace(12, 3e4, 300), [0.0, 20.0, 20.5, 88.0, 89.0]]
).astype(np.float32)


def test_every_act2cls_name_is_implemented_or_refused():
    from transformers.activations import ACT2CLS

    from eqxlm.nn._activations import ACTIVATIONS, REFUSED_ACTIVATIONS

    assert set(ACT2CLS) == (set(ACTIVATIONS) - {"bloom_gelu"}) | set(REFUSED_ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(set(ACT2FN) & set(ACTIVATIONS)))
def test_activation_matches_transformers_float32(name):
    """float32: within 1e-6 relative (and 1e-6 absolute near zero) of transformers' function."""
    want = ACT2FN[name](torch.tensor(WIDE)).numpy()
    got = np.asarray(ACTIVATIONS[name](jnp.asarray(WIDE)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=PART_ATOL, atol=PART_ATOL)


@pytest.mark.parametrize("name", sorted(set(ACT2FN) & set(ACTIVATIONS)))
def test_activation_matches_transformers_bfloat16(name):
    """bfloat16: torch rounds each op (a kernel, or a step of a Python formula, its scalars in
    float32) once from float32; so does eqxlm. Wherever x >= -3 at most 1% of values differ, by
    one ulp: torch's and XLA's float32 tanh/erf differ in their last bits, and a result on a
    bfloat16 rounding boundary goes either way. Where `1 + tanh` or `1 + erf` nearly cancels
    (tanh-GELU tails, MEGA's laplace), one ulp of that sum (2**-8) scaled by at most 2 is the
    absolute difference: measured at most 0.0054."""
    x = np.asarray(jnp.asarray(WIDE).astype(jnp.bfloat16).astype(jnp.float32))  # representable inputs
    want = ACT2FN[name](torch.tensor(x).bfloat16()).float().numpy()
    out = ACTIVATIONS[name](jnp.asarray(x).astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    got = np.asarray(out.astype(jnp.float32))
    body = x >= -3
    assert (got[body] != want[body]).mean() <= 0.01, f"{(got[body] != want[body]).mean():.2%} differ"
    np.testing.assert_allclose(got, want, rtol=2.0**-7, atol=2.0**-7)


def test_activation_gradients_are_finite_everywhere():
    """Softplus-based activations clamp the exponent: `log1p(exp(x))` past float32's overflow
    would give a NaN gradient through the branch `where` discards. (Inputs from -50: below about
    -100 softplus underflows to 0, where `sqrtsoftplus`'s derivative is infinite in torch too.)"""
    x = jnp.asarray(WIDE[WIDE >= -50])
    for name, fn in ACTIVATIONS.items():
        grad = jax.vmap(jax.grad(fn))(x)
        assert bool(jnp.all(jnp.isfinite(grad))), name
