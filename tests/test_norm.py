import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import torch
from conftest import PART_ATOL
from transformers.models.bloom.modeling_bloom import LayerNorm as TorchLayerNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm

from eqxlm.nn import LayerNorm, RMSNorm


def _x(shape=(7, 16), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 3


def test_rmsnorm_matches_mistral_and_llama():
    x = _x()
    for cls in (MistralRMSNorm, LlamaRMSNorm):
        ref = cls(16, eps=1e-5)
        with torch.no_grad():
            ref.weight.copy_(torch.randn(16))
        ours = RMSNorm(16, eps=1e-5)
        ours = eqx.tree_at(lambda n: n.weight, ours, jnp.asarray(ref.weight.detach().numpy()))
        got = jax.vmap(ours)(jnp.asarray(x))
        want = ref(torch.tensor(x)).detach().numpy()
        np.testing.assert_allclose(np.asarray(got), want, atol=PART_ATOL, rtol=0)


def test_rmsnorm_bfloat16_casts_back_before_weight():
    """HF: weight * x_normed.to(bf16). With a float32 weight the result is float32, computed
    from the bf16-rounded normalised value; multiplying first would round differently."""
    x = _x()
    ref = MistralRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(16))
    ours = eqx.tree_at(lambda n: n.weight, RMSNorm(16, 1e-6), jnp.asarray(ref.weight.detach().numpy()))
    want = ref(torch.tensor(x).bfloat16()).detach().float().numpy()
    got = jax.vmap(ours)(jnp.asarray(x).astype(jnp.bfloat16))
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), want)


def test_layernorm_matches_torch():
    x = _x(seed=1)
    ref = TorchLayerNorm(16, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(16))
        ref.bias.copy_(torch.randn(16))
    ours = eqx.tree_at(
        lambda n: (n.weight, n.bias),
        LayerNorm(16, 1e-5),
        (jnp.asarray(ref.weight.detach().numpy()), jnp.asarray(ref.bias.detach().numpy())),
    )
    np.testing.assert_allclose(
        np.asarray(jax.vmap(ours)(jnp.asarray(x))), ref(torch.tensor(x)).detach().numpy(), atol=PART_ATOL, rtol=0
    )
