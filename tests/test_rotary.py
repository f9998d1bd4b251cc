import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import PART_ATOL
from hf import hf_config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from eqxlm.models import ConfigError, LlamaConfig
from eqxlm.nn import LongRopeScaling, RotaryEmbedding, rope_inverse_frequencies, rope_scaling_from_hf

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
    ours = rope_inverse_frequencies(head_dim, theta, None if scaling is None else rope_scaling_from_hf(scaling))
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
    rope = RotaryEmbedding(head_dim, theta, None if scaling is None else rope_scaling_from_hf(scaling))
    got = rope(jnp.asarray(q), jnp.asarray(positions, jnp.int32))
    np.testing.assert_allclose(np.asarray(got), want[0].transpose(0, 1).numpy(), atol=PART_ATOL * 10, rtol=0)


def test_rotary_explicit_head_dim_differs_from_hidden_over_heads():
    rope = RotaryEmbedding(head_dim=12, theta=10000.0)
    x = jnp.ones((3, 2, 12))
    assert rope(x, jnp.arange(3, dtype=jnp.int32)).shape == (3, 2, 12)


@pytest.mark.parametrize("rope_type", ["dynamic", "su", "proportional"])
def test_unsupported_rope_types_are_rejected_by_name(rope_type):
    with pytest.raises(ValueError, match=f"rope_type '{rope_type}' is not supported"):
        rope_scaling_from_hf({"rope_type": rope_type, "factor": 2.0})
    raw = {"model_type": "llama", "rope_scaling": {"type": rope_type, "factor": 2.0}}
    with pytest.raises(ConfigError, match=rope_type):
        LlamaConfig.from_hf(raw)


def _phi3_longrope(head_dim=16, partial=0.5, orig=8, factor=None, attention_factor=None):
    import transformers

    dim = int(head_dim * partial)
    rng = np.random.default_rng(7)
    params = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "partial_rotary_factor": partial,
        "short_factor": [float(v) for v in 1.0 + rng.random(dim // 2)],
        "long_factor": [float(v) for v in 2.0 + 4.0 * rng.random(dim // 2)],
    }
    if factor is not None:
        params["factor"] = factor
    if attention_factor is not None:
        params["attention_factor"] = attention_factor
    config = transformers.Phi3Config(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        max_position_embeddings=256,
        original_max_position_embeddings=orig,
        rope_parameters=params,
    )
    scaling = {k: v for k, v in config.rope_parameters.items() if k not in ("rope_theta", "partial_rotary_factor")}
    return config, dim, rope_scaling_from_hf(scaling).resolve(config.max_position_embeddings)


@pytest.mark.parametrize("factor,attention_factor", [(None, None), (3.0, None), (None, 1.5)])
def test_longrope_frequencies_and_attention_factor_match_hf(factor, attention_factor):
    config, dim, scaling = _phi3_longrope(factor=factor, attention_factor=attention_factor)
    short, want_factor = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu")
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=config.original_max_position_embeddings + 1)
    np.testing.assert_allclose(rope_inverse_frequencies(dim, 10000.0, scaling), short.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(rope_inverse_frequencies(dim, 10000.0, scaling, long=True), long.numpy(), rtol=1e-6, atol=0)
    assert not np.allclose(short.numpy(), long.numpy())
    assert scaling.attention_scaling() == pytest.approx(want_factor, rel=1e-12) and want_factor != 1.0


@pytest.mark.parametrize("positions", [[0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 1, 2, 3, 4, 5, 8], [9], [0, 0, 0]])
def test_longrope_cos_sin_pick_short_or_long_per_call_as_phi3(positions):
    """One choice per call: long factors iff max(position) + 1 > original_max_position_embeddings
    (8 here), scaled by the attention factor, as `Phi3RotaryEmbedding` with `dynamic_rope_update`."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    config, dim, scaling = _phi3_longrope()
    ref = Phi3RotaryEmbedding(config)
    x = torch.zeros(1, len(positions), 4)
    cos, sin = ref(x, torch.tensor(positions)[None])
    rope = RotaryEmbedding(16, 10000.0, scaling, rotary_dim=dim)
    got_cos, got_sin = rope.cos_sin(jnp.asarray(positions, jnp.int32))
    np.testing.assert_allclose(np.asarray(got_cos), cos[0].numpy(), atol=PART_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(got_sin), sin[0].numpy(), atol=PART_ATOL, rtol=0)


def test_longrope_without_factors_or_attention_factor_is_refused_by_name():
    with pytest.raises(ValueError, match="longrope.*short_factor"):
        rope_scaling_from_hf({"rope_type": "longrope", "long_factor": [1.0], "original_max_position_embeddings": 4})
    scaling = LongRopeScaling(short_factor=[1.0] * 4, long_factor=[1.0] * 4, original_max_position_embeddings=4)
    with pytest.raises(ValueError, match="longrope.*factor"):
        RotaryEmbedding(8, 10000.0, scaling)
    short = LongRopeScaling(factor=2.0, short_factor=[1.0] * 3, long_factor=[1.0] * 4, original_max_position_embeddings=4)
    with pytest.raises(ValueError, match="short_factor has 3 entries, expected 4"):
        RotaryEmbedding(8, 10000.0, short)


def test_interleaved_rotary_matches_cohere():
    """`interleaved=True` rotates pairs (x[2i], x[2i+1]) as Cohere's `rotate_half` /
    `apply_rotary_pos_emb` with `repeat_interleave`d frequencies."""
    import transformers
    from transformers.models.cohere.modeling_cohere import CohereRotaryEmbedding
    from transformers.models.cohere.modeling_cohere import apply_rotary_pos_emb as cohere_apply

    rope = {"rope_type": "default", "rope_theta": 1e4}
    config = transformers.CohereConfig(hidden_size=64, num_attention_heads=4, rope_parameters=rope)
    rng = np.random.default_rng(1)
    q = rng.normal(size=(6, 4, 16)).astype(np.float32)
    positions = np.array([0, 0, 1, 2, 3, 200])
    cos, sin = CohereRotaryEmbedding(config)(torch.tensor(q), torch.tensor(positions)[None])
    qt = torch.tensor(q).transpose(0, 1)[None]
    want, _ = cohere_apply(qt, qt, cos, sin)
    got = RotaryEmbedding(16, 1e4, interleaved=True)(jnp.asarray(q), jnp.asarray(positions, jnp.int32))
    np.testing.assert_allclose(np.asarray(got), want[0].transpose(0, 1).numpy(), atol=PART_ATOL * 10, rtol=0)


def test_longrope_cached_call_crossing_the_switch_point_is_refused_by_name():
    """transformers re-encodes the whole sequence with long_factor when generation crosses
    original_max_position_embeddings; cached keys rotated with short_factor cannot be reused, so
    such a cached call is an error. Calls on one side of the switch point are cached normally."""
    import jax

    import eqxlm

    scaling = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0, 2.0], "long_factor": [3.0, 5.0]}
    config = eqxlm.models.lookup("phi3")[0].from_hf(
        {
            "model_type": "phi3", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 64,
            "original_max_position_embeddings": 6, "rope_parameters": scaling,
        }
    )  # fmt: skip
    import equinox as eqx

    model = eqxlm.DecoderLM(config, key=jax.random.key(0))
    call = eqx.filter_jit(lambda m, ids, cache=None: m(ids, cache=cache))  # eager dispatch is slow
    ids = jnp.arange(10, dtype=jnp.int32)
    out = call(model, ids[:4], model.init_cache(12))  # 4 tokens: short factors
    out = call(model, ids[4:6], out.cache)  # 6 tokens: still short
    with pytest.raises(Exception, match="longrope"):
        call(model, ids[6:7], out.cache)  # the 7th token would switch to long factors
    long = call(model, ids[:8], model.init_cache(12))  # prefilled past the switch: long from the start
    step = call(model, ids[8:9], long.cache)
    full = call(model, ids[:9]).logits
    np.testing.assert_allclose(np.asarray(step.logits[0]), np.asarray(full[8]), atol=1e-5, rtol=0)


YARN_SETTINGS = {
    "factor": {"factor": 4.0},
    "mscale": {"factor": 8.0, "mscale": 0.707, "mscale_all_dim": 1.0},
    "mscale-equal": {"factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2},
    "untruncated": {"factor": 4.0, "truncate": False, "beta_fast": 24.0},
    "attention-factor": {"factor": 2.0, "attention_factor": 0.9},
    "derived-factor": {"factor": None},
    "short-context": {"factor": 16.0, "mscale": 2.0},  # mscale alone: ignored, as in transformers
}


@pytest.mark.parametrize("head_dim,theta,original", [(16, 10000.0, 32), (64, 1e6, 4096), (24, 50000.0, 100)])
@pytest.mark.parametrize("setting", YARN_SETTINGS.values(), ids=YARN_SETTINGS.keys())
def test_yarn_frequencies_and_attention_factor_match_hf(setting, head_dim, theta, original):
    """`yarn` against `_compute_yarn_parameters`: the ramp between extrapolated and interpolated
    frequencies (with and without `truncate`, other `beta_fast`/`beta_slow`), and the attention
    factor from `factor`, from `mscale`/`mscale_all_dim`, or given; a `factor` of None derived
    from `max_position_embeddings`, as a config's `rope_spec` resolves it."""
    from eqxlm.nn import YarnScaling

    params = {"rope_type": "yarn", "rope_theta": theta, "original_max_position_embeddings": original, **setting}
    config = hf_config("llama", head_dim=head_dim, num_attention_heads=4, max_position_embeddings=8 * original)
    config.rope_parameters = params  # as read from a file: no validation rewrites it
    want, want_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    scaling = rope_scaling_from_hf({k: v for k, v in params.items() if k != "rope_theta" and v is not None})
    assert isinstance(scaling, YarnScaling)
    scaling = scaling.resolve(config.max_position_embeddings)
    np.testing.assert_allclose(rope_inverse_frequencies(head_dim, theta, scaling), want.numpy(), rtol=1e-6, atol=0)
    assert scaling.attention_scaling() == pytest.approx(want_factor, rel=1e-12)


def test_yarn_cos_sin_are_scaled_by_the_attention_factor():
    """cos and sin times the attention factor (here from `mscale`/`mscale_all_dim`), as
    `LlamaRotaryEmbedding` multiplies them by `attention_scaling`."""
    scaling = {"rope_type": "yarn", "factor": 8.0, "mscale": 1.0, "mscale_all_dim": 0.5, "original_max_position_embeddings": 16}
    _, ref = _hf(16, 10000.0, scaling)
    positions = np.array([0, 3, 15, 16, 100])
    cos, sin = ref(torch.zeros(1, 5, 4), torch.tensor(positions)[None])
    got_cos, got_sin = RotaryEmbedding(16, 10000.0, rope_scaling_from_hf(scaling)).cos_sin(jnp.asarray(positions, jnp.int32))
    assert ref.attention_scaling != 1.0
    np.testing.assert_allclose(np.asarray(got_cos), cos[0].numpy(), atol=PART_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(got_sin), sin[0].numpy(), atol=PART_ATOL, rtol=0)


def test_yarn_without_factor_or_length_is_refused_by_name():
    from eqxlm.nn import YarnScaling

    with pytest.raises(ValueError, match="yarn.*original_max_position_embeddings"):
        rope_scaling_from_hf({"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="yarn.*factor"):
        RotaryEmbedding(8, 10000.0, YarnScaling(original_max_position_embeddings=16))


@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "linear", "factor": 4.0},
        dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64),
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0, "truncate": False},
        {"rope_type": "longrope", "short_factor": [1.0, 2.0], "long_factor": [3.0, 4.0], "original_max_position_embeddings": 8},
    ],
    ids=lambda p: p["rope_type"],
)
def test_each_rope_type_reads_and_writes_its_own_fields(params):
    """Each type's class holds that type's fields only: `to_hf` writes back what `from_hf`
    read, and a field of another type is refused by name."""
    scaling = rope_scaling_from_hf(params)
    assert type(scaling).rope_type == params["rope_type"] and scaling.to_hf() == params
    other = "low_freq_factor" if params["rope_type"] != "llama3" else "short_factor"
    with pytest.raises(ValueError, match=f"unsupported field.*{other}.*{params['rope_type']}"):
        rope_scaling_from_hf({**params, other: 1.0})
