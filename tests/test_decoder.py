import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import LAYER_ATOL
from hf import additive_mask, copy_from_torch, hf_config, hf_mask, hf_model
from transformers.models.bloom.modeling_bloom import BloomBlock as TorchBloomBlock
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

import eqxlm
from eqxlm import nn
from eqxlm.models import BloomConfig, LlamaConfig, MistralConfig
from eqxlm.models._builder import make_layer
from eqxlm.models._registry import lookup
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


# one family per block layout: the layout its spec picks, the class of layer it builds, overrides
LAYOUTS = {
    "granite": (nn.PreNorm, nn.SequentialLayer, {"residual_multiplier": 0.7}),
    "gemma2": (nn.Sandwich, nn.SequentialLayer, {}),
    "olmo2": (nn.PostNorm, nn.SequentialLayer, {}),
    "phi": (nn.Parallel, nn.ParallelLayer, {}),  # one norm
    "gpt_neox": (nn.Parallel, nn.ParallelLayer, {}),  # two norms
}


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_each_block_layout_matches_the_hf_decoder_layer(family):
    """Layer 0 of each layout against its transformers layer (perturbed norms, so a norm
    in the wrong place shows), on the family's own rotary and mask."""
    layout, module, overrides = LAYOUTS[family]
    ref_model = hf_model(family, **overrides)
    ref_model.config._attn_implementation = "eager"
    layer_cls = type(ref_model.base_model.layers[0])
    ref = _perturb(layer_cls(ref_model.config, layer_idx=0))
    config = lookup(family)[0].from_hf(ref_model.config.to_dict())
    spec = config.decoder_spec()
    assert isinstance(spec.block, layout)
    ours = copy_from_torch(make_layer(spec, 0, jnp.float32, jax.random.key(0)), ref, key_map=config.key_map())
    assert type(ours) is module
    seq, window = 7, spec.layer_windows[0]
    x = np.random.default_rng(2).normal(size=(seq, spec.hidden_size)).astype(np.float32)
    positions = np.arange(seq)
    cos_sin = ref_model.base_model.rotary_emb(torch.tensor(x)[None], torch.tensor(positions)[None])
    with torch.no_grad():
        want = ref(torch.tensor(x)[None], attention_mask=additive_mask(hf_mask(seq, seq, window)), position_embeddings=cos_sin)
    want = want[0] if isinstance(want, tuple) else want
    (frame,), _ = attention_frames((window,), jnp.asarray(positions, jnp.int32), jnp.ones(seq, bool))
    got, _, _ = ours(jnp.asarray(x), frame)
    np.testing.assert_allclose(np.asarray(got), want[0].numpy(), atol=LAYER_ATOL, rtol=0)


@dataclasses.dataclass(frozen=True)
class ScaledResidual(nn.AbstractBlock):
    """A layout of the user's own: pre-norm, with the residual stream scaled by `scale` before
    each add (`h = s * x + attn`), which no eqxlm layout does."""

    scale: float

    def make(self, attn, mlp, norm):
        return ScaledResidualLayer(norm(), attn, norm(), mlp, self.scale)


class ScaledResidualLayer(nn.AbstractDecoderLayer):
    input_layernorm: nn.RMSNorm
    self_attn: nn.Attention
    post_attention_layernorm: nn.RMSNorm
    mlp: nn.GatedMLP
    scale: float = eqx.field(static=True)
    tap_points = ()

    def __call__(self, x, frame, cache=None, *, return_weights=False, taps=None):
        attn, weights, cache = self.self_attn(jax.vmap(self.input_layernorm)(x), frame, cache, return_weights=return_weights)
        h = self.scale * x + attn
        return self.scale * h + self.mlp(jax.vmap(self.post_attention_layernorm)(h)), weights, cache


@dataclasses.dataclass(frozen=True)
class ScaledLlamaConfig(LlamaConfig):
    def decoder_spec(self):
        return dataclasses.replace(super().decoder_spec(), block=ScaledResidual(0.5))


SIZES = dict(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


def test_a_users_own_block_layout_builds_generates_and_scans():
    """A layout defined here (no change to eqxlm) goes into a spec as `block`: the model is
    built of its layers, its cached generation is greedy decoding over full forwards, and the
    scanned model computes the same logits."""
    model = eqxlm.DecoderLM(ScaledLlamaConfig(**SIZES), key=jax.random.key(0))
    plain = eqxlm.DecoderLM(LlamaConfig(**SIZES), key=jax.random.key(0))
    assert all(type(layer) is ScaledResidualLayer for layer in model.model.layers)
    logits_of = eqx.filter_jit(lambda m, ids: m(ids).logits)
    ids = jnp.asarray([5, 9, 3, 17, 2])
    assert not np.allclose(logits_of(model, ids), logits_of(plain, ids))  # the same weights: only the block differs
    tokens = np.asarray(eqxlm.generate(model, np.asarray(ids)[None], max_new_tokens=5, eos_token_id=[]))[0]
    seq = np.zeros(10, np.int32)
    seq[:5] = ids
    for n in range(5, 10):  # causal: the logits at n - 1 see only seq[:n]
        seq[n] = int(jnp.argmax(logits_of(model, jnp.asarray(seq))[n - 1]))
    assert tokens.tolist() == seq.tolist()
    scanned = eqxlm.DecoderLM(ScaledLlamaConfig(**SIZES), key=jax.random.key(0), scan_layers=True)
    np.testing.assert_allclose(logits_of(scanned, ids), logits_of(model, ids), atol=1e-5, rtol=0)


def test_a_block_that_is_not_a_layout_is_refused_by_name():
    spec = LlamaConfig(**SIZES).decoder_spec()
    with pytest.raises(TypeError, match="DecoderSpec: block must be a block layout .* got str"):
        dataclasses.replace(spec, block="sandwich")
