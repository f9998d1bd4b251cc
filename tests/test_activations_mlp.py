import jax
import jax.numpy as jnp
import numpy as np
import torch
from conftest import PART_ATOL
from hf import copy_from_torch, hf_config
from transformers.models.bloom.modeling_bloom import BloomMLP as TorchBloomMLP
from transformers.models.bloom.modeling_bloom import bloom_gelu_forward
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mistral.modeling_mistral import MistralMLP

from eqxlm.nn import MLP, GatedMLP, bloom_gelu
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
