"""Every config field of every registered family is honoured, ignored for a stated reason,
or refused by name: never silently computing something else.

For each family, the test walks the fields of transformers' own config class (its
`to_dict()` keys, and the keys nested in `rope_parameters`), changes each numeric, boolean
and string field from its value in a tiny config to another value that transformers
accepts (builds and runs), saves the checkpoint with transformers, and requires eqxlm to
either match transformers' float32 logits within 1e-4 or raise `ConfigError` naming the
field. Families join by having a tiny config in `tests/hf.py` (`TINY`).
"""

import copy
import dataclasses
import tempfile

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import LOGITS_ATOL
from hf import TINY, hf_model_from_config

import eqxlm
from eqxlm.models._config import COMMON_IGNORED

#: Bookkeeping read by the loader, not the model: the dtype matrix tests cover it.
NOT_MUTATED = {"model_type", "transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype"}
#: Candidate values for fields whose tiny value is None or a string.
CANDIDATES = {
    "pad_token_id": [0],
    "sliding_window": [3],
    "head_dim": [16],
    "num_key_value_heads": [1],
    "hidden_act": ["gelu", "relu", "gelu_new", "gelu_pytorch_tanh", "silu"],
    "problem_type": ["regression"],
    "tokenizer_class": ["PreTrainedTokenizerFast"],
}
ROPE_TYPES = [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4, "original_max_position_embeddings": 16},
]
IDS = np.random.default_rng(0).integers(0, 30, size=(1, 12))


def _candidates(name, value):
    if name in CANDIDATES:
        return [c for c in CANDIDATES[name] if c != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [v for v in (value + 1, value * 2, value - 1) if v > 0 and v != value]
    if isinstance(value, float):
        return [v for v in (value * 2 if value else 0.5, value / 2, value + 0.1) if v != value]
    if isinstance(value, str):
        return [value + "_changed"]
    return []


def _mutations(base: dict):
    """(field label, full config kwargs) for every field, first the top level, then the
    keys of `rope_parameters`."""
    for name, value in base.items():
        if name in NOT_MUTATED or name == "rope_parameters":
            continue
        for candidate in _candidates(name, value):
            yield name, {**base, name: candidate}
    rope = base.get("rope_parameters")
    if isinstance(rope, dict):
        for key, value in rope.items():
            if key == "rope_type":
                for choice in ROPE_TYPES:
                    yield (
                        f"rope_parameters.{choice['rope_type']}",
                        {**base, "rope_parameters": {"rope_theta": rope["rope_theta"], **choice}},
                    )
            else:
                for candidate in _candidates(key, value):
                    yield f"rope_parameters.{key}", {**base, "rope_parameters": {**rope, key: candidate}}


def _computation(model):
    """What a forward depends on: the model less the config's verbatim `extra` fields (kept
    only to write config.json back) and its generation defaults. Two loads equal in this
    compute the same logits, so the audit runs the forward once for them (it was eager: a
    third of a second each, most of this file's time)."""
    stripped = copy.copy(model)
    object.__setattr__(stripped, "config", dataclasses.replace(model.config, extra=()))
    object.__setattr__(stripped, "generation_config", None)
    return stripped


def _transformers_run(config_class, kwargs):
    """transformers' logits for a mutated config, or None when it does not build or run."""
    try:
        config = config_class(**kwargs)
        model = hf_model_from_config(config)
        with torch.no_grad():
            logits = model(torch.tensor(IDS), return_dict=True).logits[0].numpy()
    except Exception:
        return None, None
    return model, logits


@pytest.mark.parametrize("model_type", sorted(set(TINY) & set(eqxlm.supported_model_types())))
def test_every_field_is_honoured_ignored_or_refused(model_type):
    config_class = transformers.CONFIG_MAPPING[model_type]
    base = config_class(**TINY[model_type]).to_dict()
    outcomes, tried, last, computed = {}, set(), None, []
    for label, kwargs in _mutations(base):
        field = label.split(".")[-1]
        if label in tried and not label.startswith("rope_parameters."):
            continue  # one valid changed value per field (every rope type is tried)
        model, want = _transformers_run(config_class, kwargs)
        if model is None:
            continue
        tried.add(label)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            try:
                ours = eqxlm.from_pretrained(folder)
            except eqxlm.ConfigError as e:
                names = (
                    {field, label.split(".")[0], "rope_type", "rope_scaling", "rope_parameters"} if "rope" in label else {field}
                )
                assert any(n in str(e) for n in names), f"{label}: refused without naming it: {e}"
                outcomes[label] = "refused"
                continue
            ours = _computation(ours)
            got = next((logits for model, logits in computed if bool(eqx.tree_equal(model, ours))), None)
            if got is None:
                got = np.asarray(ours(jnp.asarray(IDS[0], jnp.int32)).logits)
                computed.append((ours, got))
        np.testing.assert_allclose(
            got, want, atol=LOGITS_ATOL, rtol=0, err_msg=f"{model_type}: field {label} changed the numbers"
        )
        outcomes[label] = "match"
        last = label
    assert last is not None and len(outcomes) >= 10, outcomes


@pytest.mark.parametrize("model_type", sorted(set(TINY) & set(eqxlm.supported_model_types())))
def test_every_field_is_handled_or_ignored_with_a_reason(model_type):
    """The other side of the audit: every key transformers writes is handled by the family's
    config or on an ignore list, and the ignore lists give reasons."""
    config_class = transformers.CONFIG_MAPPING[model_type]
    ours = eqxlm.models.lookup(model_type)[0]
    written = set(config_class(**TINY[model_type]).to_dict()) - {"model_type"}
    aliases = set(getattr(ours, "aliases", {}))
    handled = set(ours.hf_fields) | set(COMMON_IGNORED) | set(ours.ignored_fields) | aliases | {"rope_parameters"}
    assert written <= handled, f"{model_type}: fields neither handled nor ignored: {sorted(written - handled)}"
    assert all(isinstance(reason, str) and reason for reason in ours.ignored_fields.values())


@pytest.mark.parametrize("model_type", sorted(set(TINY) & set(eqxlm.supported_model_types())))
def test_defaults_equal_transformers_defaults(model_type):
    """A config.json saved by transformers omits default values (`to_diff_dict`), so each
    default of eqxlm's config must be transformers' default for the same field."""
    ours = eqxlm.models.lookup(model_type)[0]
    theirs = transformers.CONFIG_MAPPING[model_type]().to_dict()
    mine = ours.from_hf({"model_type": model_type}).to_hf()
    derived = {"num_key_value_heads", "head_dim", "layer_types"}  # eqxlm's None = derived as transformers derives it
    for name in ours.hf_fields:
        if name in theirs and name not in ("rope_theta", "rope_scaling") and not (name in derived and mine.get(name) is None):
            assert mine.get(name) == theirs[name], (
                f"{model_type}: default of {name}: eqxlm {mine.get(name)!r}, transformers {theirs[name]!r}"
            )


def _tiny_raw(model_type, **fields):
    return {**transformers.CONFIG_MAPPING[model_type](**TINY[model_type]).to_dict(), **fields}


FAMILIES = sorted(set(TINY) & set(eqxlm.supported_model_types()))
HEADS = [m for m in FAMILIES if "num_key_value_heads" in eqxlm.models.lookup(m)[0].hf_fields]
LAYERED = [m for m in FAMILIES if "layer_types" in eqxlm.models.lookup(m)[0].hf_fields]


@pytest.mark.parametrize("model_type", HEADS)
def test_kv_heads_that_do_not_divide_the_heads_are_refused_by_name(model_type):
    """The shared check of every family with `num_key_value_heads`: it must be >= 1 and divide
    `num_attention_heads` (null means `num_attention_heads`, where the field allows it)."""
    config_class = eqxlm.models.lookup(model_type)[0]
    heads = config_class.from_hf(_tiny_raw(model_type)).num_attention_heads
    assert config_class.from_hf(_tiny_raw(model_type, num_key_value_heads=1)).kv_heads == 1
    for bad in (heads - 1, heads + 1, 0):
        message = rf"num_key_value_heads \({bad}\) must divide num_attention_heads \({heads}\)"
        with pytest.raises(eqxlm.ConfigError, match=message):
            config_class.from_hf(_tiny_raw(model_type, num_key_value_heads=bad))


@pytest.mark.parametrize("model_type", LAYERED)
def test_layer_types_of_the_wrong_length_or_kind_are_refused_by_name(model_type):
    """The shared `layer_types` check: one of `full_attention` / `sliding_attention` per layer."""
    config_class = eqxlm.models.lookup(model_type)[0]
    layers = config_class.from_hf(_tiny_raw(model_type)).num_hidden_layers
    full = ["full_attention"] * layers
    assert config_class.from_hf(_tiny_raw(model_type, layer_types=full)).types_by_layer() == tuple(full)
    for bad in (full[:-1], full + ["full_attention"], full[:-1] + ["chunked_attention"]):
        with pytest.raises(eqxlm.ConfigError, match=rf"layer_types: expected {layers} of"):
            config_class.from_hf(_tiny_raw(model_type, layer_types=bad))
