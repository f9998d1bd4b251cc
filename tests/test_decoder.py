import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import LAYER_ATOL
from hf import additive_mask, copy_from_torch, hf_config, hf_mask
from transformers.models.bloom.modeling_bloom import BloomBlock as TorchBloomBlock
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

from eqxlm.models import BloomConfig, LlamaConfig, MistralConfig
from eqxlm.models._builder import make_layer
from eqxlm.nn import attention_frames


def _perturb(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(p))
    return module.eval()


@pytest.mark.parametrize(
    "cls,ours_config,window", [(LlamaDecoderLayer, LlamaConfig, None), (MistralDecoderLayer, MistralConfig, 3)]
)
def test_decoder_layer_matches_hf(cls, ours_config, window):
    kind = "llama" if ours_config is LlamaConfig else "mistral"
    config = hf_config(kind, **({"sliding_window": window} if window else {}))
    config._attn_implementation = "eager"
    ref = _perturb(cls(config, layer_idx=0))
    ours_cfg = ours_config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=config.rms_norm_eps,
        **({"sliding_window": window} if ours_config is MistralConfig else {}),
    )
    ours = copy_from_torch(make_layer(ours_cfg.decoder_spec(), 0, jnp.float32, jax.random.key(0)), ref)
    seq = 8
    x = np.random.default_rng(0).normal(size=(seq, 32)).astype(np.float32)
    mask = hf_mask(seq, seq, window)  # transformers' masking_utils
    positions = np.arange(seq)
    cos_sin = LlamaRotaryEmbedding(config)(torch.tensor(x), torch.tensor(positions)[None])
    with torch.no_grad():
        want = ref(torch.tensor(x)[None], attention_mask=additive_mask(mask), position_embeddings=cos_sin)
    want = want[0] if isinstance(want, tuple) else want
    (frame,), _ = attention_frames((window,), jnp.asarray(positions, jnp.int32), jnp.ones(seq, bool))
    got, _, _ = ours(jnp.asarray(x), frame)
    np.testing.assert_allclose(np.asarray(got), want[0].numpy(), atol=LAYER_ATOL, rtol=0)


@pytest.mark.parametrize("post_ln", [False, True])
@pytest.mark.parametrize("heads", [4, 6])
def test_bloom_block_matches_hf(post_ln, heads):
    config = hf_config("bloom", hidden_size=heads * 8, n_head=heads, apply_residual_connection_post_layernorm=post_ln)
    ref = _perturb(TorchBloomBlock(config, layer_idx=0))
    config = BloomConfig(
        vocab_size=96, hidden_size=heads * 8, n_layer=1, n_head=heads, apply_residual_connection_post_layernorm=post_ln
    )
    block = make_layer(config.decoder_spec(), 0, jnp.float32, jax.random.key(0))
    ours = copy_from_torch(block, ref, key_map=config.key_map())  # BLOOM's names apply inside a block too
    seq = 7
    x = np.random.default_rng(1).normal(size=(seq, heads * 8)).astype(np.float32)
    slots = jnp.arange(seq, dtype=jnp.int32)
    alibi = build_alibi_tensor(torch.ones(1, seq, dtype=torch.long), heads, torch.float32)
    with torch.no_grad():
        want, _ = ref(torch.tensor(x)[None], alibi, additive_mask(hf_mask(seq, seq)))
    (frame,), _ = attention_frames((None,), slots, jnp.ones(seq, bool))
    got, _, _ = ours(jnp.asarray(x), frame)
    np.testing.assert_allclose(np.asarray(got), want[0].numpy(), atol=LAYER_ATOL, rtol=0)
