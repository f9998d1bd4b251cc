"""Partition specs against a literal table, and bytes per device against total / devices.

No devices are needed: the specs and the memory estimate only read the mesh's shape, so an
`AbstractMesh` of fsdp=4 x tensor=2 stands in for 8 devices. The expected specs are written
out below by hand (not produced by the rules under test): a rule changed to replicate a
weight, split the wrong dimension or name the wrong axis fails here.
"""

import math
import re

import equinox as eqx
import jax
import pytest
from families import CASES
from hf import hf_config
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import eqxlm
from eqxlm import sharding
from eqxlm.models._registry import lookup
from eqxlm.params import leaf_specs, param_refs

MESH = AbstractMesh((4, 2), ("fsdp", "tensor"))

COL = P("tensor", "fsdp")  # column-parallel: (heads x head_dim | intermediate | vocab, hidden)
ROW = P("fsdp", "tensor")  # row-parallel: (hidden, heads x head_dim | intermediate)
SPLIT_BIAS = P("tensor")
REPLICATED = P(None)

# Per family, every kind of parameter (per-layer names without `model.layers.N.`) and its spec.
_ATTN = {
    "self_attn.q_proj.weight": COL,
    "self_attn.k_proj.weight": COL,
    "self_attn.v_proj.weight": COL,
    "self_attn.o_proj.weight": ROW,
}
_ATTN_BIASES = {"self_attn.q_proj.bias": SPLIT_BIAS, "self_attn.k_proj.bias": SPLIT_BIAS, "self_attn.v_proj.bias": SPLIT_BIAS}
_GATED = {"mlp.gate_proj.weight": COL, "mlp.up_proj.weight": COL, "mlp.down_proj.weight": ROW}
_MLP_BIASED = {
    "mlp.up_proj.weight": COL,
    "mlp.up_proj.bias": SPLIT_BIAS,
    "mlp.down_proj.weight": ROW,
    "mlp.down_proj.bias": REPLICATED,
}
_RMS = {"input_layernorm.weight": REPLICATED, "post_attention_layernorm.weight": REPLICATED, "model.norm.weight": REPLICATED}
_LN = {
    **_RMS,
    "input_layernorm.bias": REPLICATED,
    "post_attention_layernorm.bias": REPLICATED,
    "model.norm.bias": REPLICATED,
}
_EMBED = {"model.embed_tokens.weight": COL}
_HEAD = {"lm_head.weight": COL}

EXPECTED = {
    "llama": {**_EMBED, **_ATTN, **_GATED, **_RMS, **_HEAD},
    "mistral": {**_EMBED, **_ATTN, **_GATED, **_RMS, **_HEAD},
    "qwen2": {**_EMBED, **_ATTN, **_ATTN_BIASES, **_GATED, **_RMS, **_HEAD},
    "gemma": {**_EMBED, **_ATTN, **_GATED, **_RMS},  # tied head
    "bloom": {
        **_EMBED,
        "model.embed_norm.weight": REPLICATED,
        "model.embed_norm.bias": REPLICATED,
        **_ATTN,
        **_ATTN_BIASES,
        "self_attn.o_proj.bias": REPLICATED,
        **_MLP_BIASED,
        **_LN,
    },
    "gpt_neox": {**_EMBED, **_ATTN, **_ATTN_BIASES, "self_attn.o_proj.bias": REPLICATED, **_MLP_BIASED, **_LN, **_HEAD},
    "gpt2": {
        **_EMBED,
        "model.embed_positions.weight": P(None, "fsdp"),
        **_ATTN,
        **_ATTN_BIASES,
        "self_attn.o_proj.bias": REPLICATED,
        **_MLP_BIASED,
        **_LN,
    },
}

_SANDWICH = {**_RMS, "attn_out_norm.weight": REPLICATED, "mlp_out_norm.weight": REPLICATED}
_POST = {"attn_out_norm.weight": REPLICATED, "mlp_out_norm.weight": REPLICATED, "model.norm.weight": REPLICATED}
_QK_NORM = {"self_attn.q_norm.weight": REPLICATED, "self_attn.k_norm.weight": REPLICATED}
_O_BIAS = {"self_attn.o_proj.bias": REPLICATED}
EXPECTED.update(
    {
        "qwen3": {**_EMBED, **_ATTN, **_ATTN_BIASES, **_O_BIAS, **_QK_NORM, **_GATED, **_RMS, **_HEAD},
        "gemma2": {**_EMBED, **_ATTN, **_GATED, **_SANDWICH},  # tied head
        "gemma3_text": {**_EMBED, **_ATTN, **_QK_NORM, **_GATED, **_SANDWICH},  # tied head
        "olmo2": {**_EMBED, **_ATTN, **_QK_NORM, **_GATED, **_POST, **_HEAD},
        "granite": {**_EMBED, **_ATTN, **_GATED, **_RMS, **_HEAD},
        "phi3": {**_EMBED, **_ATTN, **_GATED, **_RMS, **_HEAD},
        "starcoder2": {**_EMBED, **_ATTN, **_ATTN_BIASES, **_O_BIAS, **_MLP_BIASED, **_LN},  # tied head
        "phi": {
            **_EMBED,
            **_ATTN,
            **_ATTN_BIASES,
            **_O_BIAS,
            "self_attn.q_norm.weight": REPLICATED,
            "self_attn.q_norm.bias": REPLICATED,
            "self_attn.k_norm.weight": REPLICATED,
            "self_attn.k_norm.bias": REPLICATED,
            **_MLP_BIASED,
            "input_layernorm.weight": REPLICATED,
            "input_layernorm.bias": REPLICATED,
            "model.norm.weight": REPLICATED,
            "model.norm.bias": REPLICATED,
            **_HEAD,
            "lm_head.bias": SPLIT_BIAS,
        },
        # Cohere's per-head q/k norm weights are (heads, head_dim): replicated whole.
        "cohere": {
            **_EMBED,
            **_ATTN,
            "self_attn.q_norm.weight": P(None, None),
            "self_attn.k_norm.weight": P(None, None),
            **_GATED,
            "input_layernorm.weight": REPLICATED,
            "model.norm.weight": REPLICATED,
        },
    }
)
#: Mixtures of experts split their stacked experts axis (expert parallelism), which this per-layer
#: table does not express; tests/test_moe.py and the 8-device family test check their placement.
MOE_FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")

# Bytes per device over total / 8 on this mesh, measured: llama and mistral 1.048, gemma 1.043,
# qwen2 1.067, bloom 1.172, gpt_neox 1.182, gpt2 1.213 (replicated norms and biases, which are
# a large share of these tiny models).
MAX_FACTOR = 1.3

_FIRST: dict[str, dict] = {}
for _family, _overrides in CASES.values():
    _FIRST.setdefault(_family, _overrides)


def _abstract(family: str, scan_layers: bool = False):
    config_class, _ = lookup(family)
    config = config_class.from_hf(hf_config(family, **_FIRST.get(family, {})).to_dict())
    return eqx.filter_eval_shape(lambda: eqxlm.DecoderLM(config, key=jax.random.key(0), scan_layers=scan_layers))


def _kind(name: str) -> str:
    return re.sub(r"^model\.layers\.\d+\.", "", name)


def test_every_family_has_a_row():
    builtin = [t for t in eqxlm.supported_model_types() if lookup(t)[0].__module__.startswith("eqxlm.")]  # not a test's own
    assert sorted([*EXPECTED, *MOE_FAMILIES]) == sorted(builtin)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_partition_specs_match_the_table(family):
    specs = sharding.parameter_specs(_abstract(family), MESH)
    kinds = {_kind(name) for name in specs}
    assert kinds == set(EXPECTED[family]), kinds ^ set(EXPECTED[family])
    wrong = {name: spec for name, spec in specs.items() if spec != EXPECTED[family][_kind(name)]}
    assert not wrong, wrong


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_scanned_layers_keep_the_layer_axis_unsplit(family):
    model = _abstract(family, scan_layers=True)
    specs = leaf_specs(model, MESH, model.partition_rules())
    refs = {ref.leaf: ref for ref in param_refs(model)}
    stacked = 0
    for leaf, spec in specs.items():
        ref = refs[leaf]
        want = EXPECTED[family][_kind(ref.name)]
        if ref.index:
            stacked += 1
            assert spec == P(*([None] * len(ref.index)), *want), (ref.name, spec)
        else:
            assert spec == want, (ref.name, spec)
    assert stacked > 0


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_bytes_per_device_near_total_over_devices(family):
    model = _abstract(family)
    mem = sharding.memory_per_device(model, MESH)
    assert mem["devices"] == 8
    # the same figure from the literal table: each tensor's bytes over the mesh axes it names
    want = 0.0
    for ref in param_refs(model):
        axes = [a for a in EXPECTED[family][_kind(ref.name)] if a is not None]
        want += math.prod(ref.shape) * 4 / math.prod(MESH.shape[a] for a in axes)
    assert mem["bytes_per_device"] == want
    assert mem["bytes_total"] == sum(math.prod(ref.shape) * 4 for ref in param_refs(model))
    factor = mem["bytes_per_device"] / (mem["bytes_total"] / 8)
    assert 1.0 <= factor <= MAX_FACTOR, factor


LORA_EXPECTED = {
    # A (r, in) split as its base weight's input dimension, B (out, r) as its output dimension
    "self_attn.q_proj.lora_A": P(None, "fsdp"),
    "self_attn.q_proj.lora_B": P("tensor", None),
    "self_attn.v_proj.lora_A": P(None, "fsdp"),
    "self_attn.v_proj.lora_B": P("tensor", None),
    "self_attn.o_proj.lora_A": P(None, "tensor"),
    "self_attn.o_proj.lora_B": P("fsdp", None),
    "mlp.up_proj.lora_A": P(None, "fsdp"),
    "mlp.up_proj.lora_B": P("tensor", None),
    "mlp.down_proj.lora_A": P(None, "tensor"),
    "mlp.down_proj.lora_B": P("fsdp", None),
}


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_lora_adapters_split_as_their_base_weights(family):
    """`eqxlm.lora` adapters on attention and MLP projections: the base weights keep their
    specs, each A and B is split along the dimension it shares with its base weight."""
    from eqxlm import lora

    config_class, _ = lookup(family)
    config = config_class.from_hf(hf_config(family, **_FIRST.get(family, {})).to_dict())
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    model = eqx.filter_eval_shape(
        lambda: lora.add_adapters(
            eqxlm.DecoderLM(config, key=jax.random.key(0)), lora.LoraConfig(r=4, target_modules=targets), key=jax.random.key(1)
        )
    )
    by_leaf = leaf_specs(model, MESH, model.partition_rules())
    specs = {ref.name: by_leaf[ref.leaf] for ref in param_refs(model)}
    adapters = {name: spec for name, spec in specs.items() if ".lora_" in name}
    assert adapters and {_kind(n) for n in adapters} == set(LORA_EXPECTED)
    assert {n: s for n, s in adapters.items() if s != LORA_EXPECTED[_kind(n)]} == {}
    base = EXPECTED.get(family, {})
    assert all(specs[n] == base[_kind(n)] for n in specs if ".lora_" not in n and _kind(n) in base)
