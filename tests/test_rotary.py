import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import PART_ATOL
from hf import hf_config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from eqxlm.models import ConfigError, LlamaConfig
from eqxlm.nn import RopeScaling, RotaryEmbedding, rope_inverse_frequencies

SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
]


def _hf(head_dim, theta, scaling):
    params = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    config = hf_config("llama", head_dim=head_dim, rope_parameters=params, num_attention_heads=4)
    return config, LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("scaling", SCALINGS, ids=["default", "linear", "llama3"])
@pytest.mark.parametrize("head_dim,theta", [(8, 10000.0), (16, 1e6), (64, 500000.0)])
def test_inverse_frequencies_match_hf(scaling, head_dim, theta):
    config, ref = _hf(head_dim, theta, scaling)
    ours = rope_inverse_frequencies(head_dim, theta, None if scaling is None else RopeScaling(**scaling))
    np.testing.assert_allclose(ours, ref.inv_freq.numpy(), rtol=1e-6, atol=0)
    if scaling:
        want, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
        np.testing.assert_allclose(ours, want.numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("scaling", SCALINGS, ids=["default", "linear", "llama3"])
def test_rotary_matches_apply_rotary_pos_emb_at_explicit_positions(scaling):
    head_dim, theta = 16, 10000.0
    _, ref = _hf(head_dim, theta, scaling)
    rng = np.random.default_rng(0)
    q = rng.normal(size=(6, 4, head_dim)).astype(np.float32)  # seq heads head_dim
    positions = np.array([0, 0, 0, 1, 2, 300])  # left padding, then a far offset (a cached step)
    cos, sin = ref(torch.tensor(q), torch.tensor(positions)[None])
    qt = torch.tensor(q).transpose(0, 1)[None]  # 1 heads seq head_dim
    want, _ = apply_rotary_pos_emb(qt, qt, cos, sin)
    rope = RotaryEmbedding(head_dim, theta, None if scaling is None else RopeScaling(**scaling))
    got = rope(jnp.asarray(q), jnp.asarray(positions, jnp.int32))
    np.testing.assert_allclose(np.asarray(got), want[0].transpose(0, 1).numpy(), atol=PART_ATOL * 10, rtol=0)


def test_rotary_explicit_head_dim_differs_from_hidden_over_heads():
    rope = RotaryEmbedding(head_dim=12, theta=10000.0)
    x = jnp.ones((3, 2, 12))
    assert rope(x, jnp.arange(3, dtype=jnp.int32)).shape == (3, 2, 12)


@pytest.mark.parametrize("rope_type", ["dynamic", "yarn", "longrope"])
def test_unsupported_rope_types_are_rejected_by_name(rope_type):
    with pytest.raises(ValueError, match=rope_type):
        RopeScaling(rope_type=rope_type, factor=2.0)
    raw = {"model_type": "llama", "rope_scaling": {"type": rope_type, "factor": 2.0}}
    with pytest.raises(ConfigError, match=rope_type):
        LlamaConfig.from_hf(raw)
