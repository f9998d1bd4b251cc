"""LoRA adapters in PEFT's format, by tree surgery.

    config = lora.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = lora.add_adapters(model, config, key=jax.random.key(0))   # B = 0: the same logits
    opt_state = optimizer.init(eqx.filter(model, lora.trainable(model)))
    model, opt_state, loss = training.train_step(model, opt_state, batch, optimizer=optimizer,
                                                 trainable=lora.trainable(model))
    lora.save_adapter(model, "adapter/")      # adapter_config.json + adapter_model.safetensors
    model = lora.load_adapter(base, "adapter/")  # also reads what PEFT saves
    merged = lora.merge(model)                # W + s B A (unmerge subtracts it); merge_and_unload drops the adapters

A projection with an adapter is a [`LoRALinear`][]: an `eqx.nn.Linear` (the same weight,
the same parameter names) plus `lora_A` `(r, in)` and `lora_B` `(out, r)`, computing
`W x + b + s * B (A dropout(x))` with `s = lora_alpha / r` (or `/ sqrt(r)` with `use_rslora`).

`target_modules` are matched as PEFT matches them, against the **checkpoint's** module names
(`q_proj`, BLOOM's `query_key_value`, GPT-2's `c_attn`): a list of names matches a module
whose name is one of them or ends with `.name`; a string is a regular expression over the
whole name. A fused checkpoint projection that eqxlm holds as `q_proj`/`k_proj`/`v_proj`
gets one adapter per part with **the same A** and B split as the base weight's rows are
(`eqxlm.params.Fused`), which is exactly PEFT's adapter on the fused module. If training
made the parts' A differ, `save_adapter` writes the exact equivalent of rank `parts * r`
(stacked A, block B) with PEFT's `rank_pattern`/`alpha_pattern`.

Loading reads every field of PEFT's `adapter_config.json` and sorts it three ways ([`USED`][],
[`NO_EFFECT`][] with the reason, [`REFUSED`][]): DoRA, adapters other than LoRA, trained
biases, `modules_to_save`, the LoRA variants, and an `init_lora_weights` that rewrote the base
weights the adapter was trained on (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA: convert those to plain
LoRA with PEFT first) are refused by name, as is any field this version does not know when it is
set. Embeddings are refused as targets.
Dropout applies only when a key is given with [`with_dropout`][]; a projection called one token
at a time (inside the MLP) then draws one mask per sequence.
"""

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from . import _safetensors as st
from . import module_paths as paths
from .nn import AbstractTokenAxes
from .nn._linear import affine, matmul
from .params import CheckpointTensor, KeyMap, param_refs

PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """PEFT's `LoraConfig` fields eqxlm supports (same names, same defaults)."""

    r: int = 8
    lora_alpha: float = 8
    target_modules: Sequence[str] | str | None = None
    lora_dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def _pattern(self, patterns: dict, name: str, default):
        for key, value in patterns.items():
            if re.match(rf"(.*\.)?({key})$", name):  # peft.utils.other.get_pattern_key
                return value
        return default

    def rank_of(self, name: str) -> int:
        return self._pattern(self.rank_pattern, name, self.r)

    def alpha_of(self, name: str) -> float:
        return self._pattern(self.alpha_pattern, name, self.lora_alpha)

    def matches(self, name: str) -> bool:
        targets = self.target_modules
        if targets is None:
            raise ValueError("LoraConfig: target_modules is required (e.g. ['q_proj', 'v_proj']).")
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return any(name == t or name.endswith("." + t) for t in targets)


class LoRALinear(eqx.nn.Linear, AbstractTokenAxes):
    """An `eqx.nn.Linear` with a low-rank adapter: `W x + b + scaling * B (A dropout(x))`.

    `merged` (static): the adapter is already added to `weight` (see [`merge`][])."""

    lora_A: Float[Array, "rank in_features"]
    lora_B: Float[Array, "out_features rank"]
    dropout_key: PRNGKeyArray | None
    scaling: float = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    merged: bool = eqx.field(static=True)

    def __init__(
        self, base: eqx.nn.Linear, lora_A, lora_B, scaling: float, dropout: float = 0.0, merged: bool = False, dropout_key=None
    ):
        self.weight, self.bias = base.weight, base.bias
        self.in_features, self.out_features, self.use_bias = base.in_features, base.out_features, base.use_bias
        self.lora_A, self.lora_B = lora_A, lora_B
        self.scaling, self.dropout, self.merged, self.dropout_key = scaling, dropout, merged, dropout_key

    def base(self) -> eqx.nn.Linear:
        return eqx.nn.Linear(self.in_features, self.out_features, self.use_bias, dtype=self.weight.dtype, key=jax.random.key(0))

    def __call__(self, x, *, key=None):
        y = affine(self, x)
        if self.merged:
            return y
        if self.dropout_key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0.0).astype(x.dtype)
        a, b = self.lora_A.astype(x.dtype), self.lora_B.astype(x.dtype)
        delta = matmul(matmul(x, a.T), b.T)  # peft: two Linear layers, each rounded once
        return y + delta * jnp.asarray(self.scaling, x.dtype)


def _plain(node: LoRALinear, weight) -> eqx.nn.Linear:
    linear = eqx.nn.Linear(node.in_features, node.out_features, node.use_bias, key=jax.random.key(0))
    return eqx.tree_at(lambda m: (m.weight, m.bias), linear, (weight, node.bias), is_leaf=lambda x: x is None)


# -- which projections ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Target:
    """A checkpoint projection `hf_name` held by the eqxlm projections `parts` (several for a
    fused checkpoint tensor), each with the row order of `fused` (or None)."""

    hf_name: str
    parts: tuple[str, ...]
    fused: object


def _targets(model, select=None) -> list[_Target]:
    key_map = model.key_map() if hasattr(model, "key_map") else KeyMap()
    modules = paths.module_paths(model)
    out = []
    for tensor in key_map.checkpoint_tensors(param_refs(model)):
        if not tensor.name.endswith(".weight") or len(tensor.parts[0].shape) != 2:
            continue
        parts = tuple(p.name[: -len(".weight")] for p in tensor.parts)
        if not all(isinstance(modules.get(p), eqx.nn.Linear) for p in parts):
            if select is not None and select(tensor.name[: -len(".weight")]):
                raise ValueError(f"LoRA: {tensor.name[: -len('.weight')]} is not a linear projection (embeddings are refused).")
            continue
        hf_name = tensor.name[: -len(".weight")]
        if select is None or select(hf_name):
            out.append(_Target(hf_name, parts, tensor.fused))
    return out


def _stack(arrays: list):
    """`jnp.stack`, also of `jax.ShapeDtypeStruct`s (the skeleton `load_adapter` fills)."""
    if isinstance(arrays[0], jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(arrays), *arrays[0].shape), arrays[0].dtype)
    return jnp.stack(arrays)


def _place(model, per_part: dict[str, tuple], dropout: float):
    """Put an adapter `(a, b, scaling)` on each eqxlm projection named in `per_part`;
    scanned layers get theirs stacked (every layer of a segment, or an error)."""
    groups: dict[tuple, dict[int, tuple]] = {}
    info = {}
    for name, values in per_part.items():
        steps, reps, row, _ = paths.locate(model, name)
        key = tuple(map(str, steps))
        groups.setdefault(key, {})[row] = values
        info[key] = (steps, reps, name)
    for key, rows in groups.items():
        steps, reps, name = info[key]
        getter = paths.getter(steps)
        node = getter(model)
        if isinstance(node, LoRALinear):
            raise ValueError(f"LoRA: {name} already has an adapter (merge_and_unload it first).")
        if reps:
            if sorted(rows) != list(range(reps)):
                raise ValueError(
                    f"LoRA: {name} is in a scanned segment of {reps} layers; adapters there go on every layer of "
                    "the segment or none (or load the model with scan_layers=False)."
                )
            if len({rows[r][2] for r in range(reps)}) != 1 or len({rows[r][0].shape for r in range(reps)}) != 1:
                raise ValueError(f"LoRA: the layers of {name}'s scanned segment need the same rank and alpha.")
            a = _stack([rows[r][0] for r in range(reps)])
            b = _stack([rows[r][1] for r in range(reps)])
            scaling = rows[0][2]
        else:
            a, b, scaling = rows[-1]
        model = eqx.tree_at(getter, model, LoRALinear(node, a, b, scaling, dropout))
    return model


def add_adapters(model, config: LoraConfig, *, key: PRNGKeyArray, dtype=None):
    """`model` with a LoRA adapter on every projection `config.target_modules` names: A as
    PEFT initialises it (uniform in `±1/sqrt(in)`), B zero, so the logits are unchanged."""
    _check_config(config)
    targets = _targets(model, config.matches)
    if not targets:
        raise ValueError(f"LoRA: target_modules {config.target_modules!r} match no projection of {type(model).__name__}.")
    modules = paths.module_paths(model)
    per_part = {}
    keys = jax.random.split(key, len(targets))
    for target, k in zip(targets, keys, strict=True):
        first = modules[target.parts[0]]
        r, dt = config.rank_of(target.hf_name), dtype or first.weight.dtype
        bound = 1.0 / math.sqrt(first.in_features)
        a = jax.random.uniform(k, (r, first.in_features), jnp.float32, -bound, bound).astype(dt)
        scaling = config.scaling(r, config.alpha_of(target.hf_name))
        for part in target.parts:
            b = jnp.zeros((modules[part].out_features, r), dt)
            per_part[part] = (a, b, scaling)
    return _place(model, per_part, config.lora_dropout)


def _check_config(config: LoraConfig):
    if config.r <= 0:
        raise ValueError(f"LoraConfig: r must be positive, got {config.r}.")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise ValueError(f"LoraConfig: lora_dropout must be in [0, 1), got {config.lora_dropout}.")


def _is_lora(x) -> bool:
    return isinstance(x, LoRALinear)


def trainable(model):
    """A filter for `eqx.partition`/`eqx.filter`: True at the adapters' `lora_A`/`lora_B`
    leaves only (pass it as `train_step(..., trainable=)`)."""
    nodes = [x for x in jax.tree.leaves(model, is_leaf=_is_lora) if _is_lora(x)]
    if not nodes:
        raise ValueError("LoRA: the model has no adapters (add_adapters or load_adapter first).")
    spec = jax.tree.map(lambda _: False, model)
    lora_nodes = lambda s: [x for x in jax.tree.leaves(s, is_leaf=_is_lora) if _is_lora(x)]  # noqa: E731
    where = lambda s: [n.lora_A for n in lora_nodes(s)] + [n.lora_B for n in lora_nodes(s)]  # noqa: E731
    return eqx.tree_at(where, spec, [True] * (2 * len(nodes)))


def with_dropout(model, key: PRNGKeyArray | None):
    """`model` whose adapters apply their dropout with keys drawn from `key` (None: off)."""
    nodes = [x for x in jax.tree.leaves(model, is_leaf=_is_lora) if _is_lora(x)]
    where = lambda m: [n.dropout_key for n in jax.tree.leaves(m, is_leaf=_is_lora) if _is_lora(n)]  # noqa: E731
    if key is None:
        keys = [None] * len(nodes)
    else:
        keys = []
        for i, n in enumerate(nodes):
            k = jax.random.fold_in(key, i)
            keys.append(jax.random.split(k, n.lora_A.shape[0]) if n.lora_A.ndim == 3 else k)
    return eqx.tree_at(where, model, keys, is_leaf=lambda x: x is None)


def _delta(node: LoRALinear):
    def one(a, b):
        return (b.astype(jnp.float32) @ a.astype(jnp.float32)) * node.scaling

    return jax.vmap(one)(node.lora_A, node.lora_B) if node.lora_A.ndim == 3 else one(node.lora_A, node.lora_B)


def _map_lora(model, fn):
    return jax.tree.map(lambda x: fn(x) if _is_lora(x) else x, model, is_leaf=_is_lora)


def merge(model):
    """Adapters added into the base weights (`W + s B A`), kept for [`unmerge`][]."""

    def go(n):
        if n.merged:
            return n
        w = (n.weight.astype(jnp.float32) + _delta(n)).astype(n.weight.dtype)
        return LoRALinear(eqx.tree_at(lambda m: m.weight, n, w), n.lora_A, n.lora_B, n.scaling, n.dropout, True, n.dropout_key)

    return _map_lora(model, go)


def unmerge(model):
    """Undo [`merge`][] (`W - s B A`)."""

    def go(n):
        if not n.merged:
            return n
        w = (n.weight.astype(jnp.float32) - _delta(n)).astype(n.weight.dtype)
        return LoRALinear(eqx.tree_at(lambda m: m.weight, n, w), n.lora_A, n.lora_B, n.scaling, n.dropout, False, n.dropout_key)

    return _map_lora(model, go)


def merge_and_unload(model):
    """Plain projections with the adapters merged in (a model `save_pretrained` writes)."""
    merged = merge(model)
    return _map_lora(merged, lambda n: _plain(n, n.weight))


# -- PEFT's files ----------------------------------------------------------------------
def _adapters(model) -> dict[str, LoRALinear]:
    """Every adapter by eqxlm projection name (scanned layers sliced per layer)."""
    out = {}
    for name, node in paths.module_paths(model).items():
        if _is_lora(node):
            out[name] = node
    return out


def _per_layer(model, name, node):
    steps, reps, row, _ = paths.locate(model, name)
    if reps:
        return node.lora_A[row], node.lora_B[row]
    return node.lora_A, node.lora_B


def save_adapter(model, directory: str, *, base_model_name_or_path: str | None = None) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` as PEFT does
    (`PeftModel.from_pretrained(transformers_model, directory)` reads them)."""
    from safetensors.numpy import save_file

    adapters = _adapters(model)
    if not adapters:
        raise ValueError("save_adapter: the model has no adapters.")
    if any(n.merged for n in adapters.values()):
        raise ValueError("save_adapter: unmerge the adapters first.")
    targets = _targets(model)
    tensors, ranks, alphas, names = {}, {}, {}, set()
    first = next(iter(adapters.values()))
    r0 = first.lora_A.shape[-2]
    dropout = first.dropout
    use_rslora = False
    scalings = {}
    for target in targets:
        if not all(p in adapters for p in target.parts):
            if any(p in adapters for p in target.parts):
                raise ValueError(
                    f"save_adapter: {target.hf_name} is fused in the checkpoint; adapt all of {target.parts} or none."
                )
            continue
        values = [_per_layer(model, p, adapters[p]) for p in target.parts]
        a_parts = [np.asarray(a, np.float32) for a, _ in values]
        b_parts = [np.asarray(b, np.float32) for _, b in values]
        scaling = adapters[target.parts[0]].scaling
        r = a_parts[0].shape[0]
        if target.fused is None:
            a, b = a_parts[0], b_parts[0]
        elif all(np.array_equal(a_parts[0], x) for x in a_parts[1:]):
            a, b = a_parts[0], target.fused.join(b_parts)
        else:  # trained apart: rank parts*r, A stacked, B block-diagonal in the fused row order
            a = np.concatenate(a_parts, axis=0)
            blocks = []
            for i, bp in enumerate(b_parts):
                block = np.zeros((bp.shape[0], r * len(b_parts)), np.float32)
                block[:, i * r : (i + 1) * r] = bp
                blocks.append(block)
            b = target.fused.join(blocks)
        rank = a.shape[0]
        scalings[target.hf_name] = (rank, scaling, r)
        dt = np.asarray(values[0][0]).dtype
        tensors[f"{PEFT_PREFIX}{target.hf_name}.lora_A.weight"] = np.ascontiguousarray(a.astype(dt))
        tensors[f"{PEFT_PREFIX}{target.hf_name}.lora_B.weight"] = np.ascontiguousarray(b.astype(dt))
        names.add(target.hf_name.rsplit(".", 1)[-1])
    base_alpha = scalings[next(iter(scalings))][1] * r0
    for hf_name, (rank, scaling, _) in scalings.items():
        if rank != r0:
            ranks[re.escape(hf_name)] = rank
        alpha = scaling * rank
        if not math.isclose(alpha, base_alpha, rel_tol=1e-12):
            alphas[re.escape(hf_name)] = alpha
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r0,
        "lora_alpha": base_alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(names),
        "use_rslora": use_rslora,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": bool(model.key_map().transposed) if hasattr(model, "key_map") else False,
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})


# Every field of PEFT's `LoraConfig` (peft 0.21.2) and what loading an adapter does with it,
# so that no setting changes PEFT's numbers without eqxlm either reproducing it or refusing
# it (tests/test_lora.py checks this table against peft's dataclass).
USED = {
    "r": "the rank (the tensors' shapes say it per module)",
    "lora_alpha": "scaling = lora_alpha / r",
    "use_rslora": "scaling = lora_alpha / sqrt(r)",
    "rank_pattern": "per-module ranks (PEFT's regex rule)",
    "alpha_pattern": "per-module alphas (PEFT's regex rule)",
    "lora_dropout": "applied in training only (`with_dropout`)",
}
NO_EFFECT = {
    "task_type": "which PEFT wrapper; the adapter tensors sit on the base model's projections under the same "
    "names (a task head comes as modules_to_save, refused)",
    "auto_mapping": "metadata",
    "peft_version": "metadata",
    "base_model_name_or_path": "metadata",
    "revision": "metadata",
    "inference_mode": "whether PEFT trains the adapter (requires_grad)",
    "target_modules": "chooses the modules when the adapter is created; loading follows the tensors in the file, "
    "which hold A and B for every adapted module",
    "exclude_modules": "as target_modules",
    "layers_to_transform": "as target_modules",
    "layers_pattern": "as target_modules",
    "fan_in_fan_out": "PEFT resets it per module from the module's type (True for GPT-2's Conv1D, False for "
    "nn.Linear); A and B have the same shapes either way",
    "runtime_config": "not saved (to_dict drops it): GPU offloading at run time",
    "megatron_core": "read only with megatron_config (refused)",
    "qalora_group_size": "read only with use_qalora (refused)",
    "loftq_config": "read only when init_lora_weights is 'loftq' (refused)",
    "eva_config": "read only when init_lora_weights is 'eva', which leaves the base weights alone",
    "corda_config": "read only when init_lora_weights is 'corda' (refused)",
    "lora_ga_config": "read only when init_lora_weights is 'lora_ga' (refused)",
    "ensure_weight_tying": "ties the adapters of tied embeddings and heads; it acts only on embedding adapters, "
    "modules_to_save and trainable_token_indices, each refused",
}
# Initialisations that only set the starting A and B, which the file's trained values replace.
# The others (pissa, pissa_niter_<n>, olora, corda, loftq, lora_ga) trained the adapter on a
# base they rewrote (W - s B0 A0, or LoftQ's quantised W); PEFT's `from_pretrained` redoes that
# from whatever base it is given (lora_ga cannot, and leaves it), so the file alone does not
# say which weights the adapter belongs to.
HARMLESS_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
REFUSED = {  # field: (the value that means "off", what it is)
    "peft_type": ("LORA", "an adapter type other than LoRA"),
    "bias": ("none", "trained biases of the base model"),
    "use_dora": (False, "DoRA (a magnitude vector per output)"),
    "modules_to_save": (None, "whole trained copies of other modules"),
    "lora_bias": (False, "a bias on lora_B"),
    "use_qalora": (False, "QA-LoRA (pooled inputs to A)"),
    "megatron_config": (None, "LoRA on Megatron's parallel layers"),
    "trainable_token_indices": (None, "trained rows of the embedding"),
    "layer_replication": (None, "a deeper model built from repeated base layers"),
    "target_parameters": (None, "LoRA on raw parameters (experts), not on projections"),
    "alora_invocation_tokens": (None, "activated LoRA (only after the invocation tokens)"),
    "use_bdlora": (None, "block-diagonal LoRA"),
    "arrow_config": (None, "Arrow routing among adapters"),
    "kasa_config": (None, "KaSA (a truncated base and a learnable diagonal)"),
    "velora_config": (None, "VeLoRA (extra saved state)"),
    "monteclora_config": (None, "MonteCLoRA (a sampler with saved state)"),
}


def _is_off(value, off) -> bool:
    if off is None or off is False:
        return value in (None, False) or value == [] or value == {}
    return value == off


def read_config(directory: str) -> LoraConfig:
    """`adapter_config.json` as a [`LoraConfig`][]. Every field PEFT writes is either used,
    known not to change the numbers, or refused by name when set (DoRA, a base rewritten by
    PiSSA, OLoRA, CorDA, LoftQ or LoRA-GA, ...); a field this version does not know is
    refused unless it is off (None, false or empty)."""
    path = os.path.join(directory, "adapter_config.json")
    with open(path) as f:
        raw = json.load(f)
    for field, value in raw.items():
        if field in REFUSED:
            off, what = REFUSED[field]
            if not _is_off(value, off):
                raise ValueError(f"{path}: {field}={value!r} ({what}) is not supported by eqxlm; expected {off!r}.")
        elif field == "init_lora_weights":
            if value not in HARMLESS_INITS:
                raise ValueError(
                    f"{path}: init_lora_weights={value!r} rewrote the base weights the adapter was trained on, so "
                    "it does not apply to the original model. Convert it to a plain LoRA adapter with PEFT "
                    "(`save_pretrained(dir, path_initial_model_for_weight_conversion=<the adapter saved before "
                    "training>)`) or load the merged model (`merge_and_unload()`); onto the residual base PEFT "
                    "saved, set init_lora_weights to true in adapter_config.json."
                )
        elif field not in USED and field not in NO_EFFECT and not _is_off(value, None):
            raise ValueError(
                f"{path}: field {field}={value!r} is not known to eqxlm (written for peft 0.21.2), so it may "
                "change the adapter's numbers; refused rather than loaded wrong."
            )
    return LoraConfig(
        r=raw["r"],
        lora_alpha=raw["lora_alpha"],
        target_modules=raw["target_modules"],
        lora_dropout=raw.get("lora_dropout", 0.0),
        use_rslora=raw.get("use_rslora", False),
        rank_pattern=raw.get("rank_pattern") or {},
        alpha_pattern=raw.get("alpha_pattern") or {},
    )


#: Another spelling of PEFT's tensor names (`lora_A.default.weight`, the adapter's name kept).
PEFT_ALIASES = ((r"\.default(?=\.weight$)", ""),)


def load_adapter(model, directory: str):
    """`model` with the adapter PEFT (or [`save_adapter`][]) wrote in `directory`.

    Its tensors fill the adapters as `eqxlm.from_pretrained` fills a model
    (`eqxlm.checkpoint.fill`): float tensors of any float dtype cast to the base weights'
    dtype, and one `eqxlm.CheckpointError` naming every missing, unexpected, misshapen or
    non-float tensor. Each rank is the one its `lora_A` is saved with."""
    from .checkpoint import Expected, fill

    config = read_config(directory)
    path = os.path.join(directory, "adapter_model.safetensors")
    reader = st.SafetensorsFile(path)
    saved = {}
    for name, info in reader.entries.items():
        for pattern, replacement in PEFT_ALIASES:
            name = re.sub(pattern, replacement, name)
        saved[name] = info.shape
    if not saved:
        raise st.CheckpointError(f"{path}: no adapter tensors.")
    modules = paths.module_paths(model)
    per_part, planned = {}, []
    for target in _targets(model):
        a_key, b_key = f"{PEFT_PREFIX}{target.hf_name}.lora_A.weight", f"{PEFT_PREFIX}{target.hf_name}.lora_B.weight"
        if a_key not in saved and b_key not in saved:
            continue
        a_shape, b_shape = saved.get(a_key, ()), saved.get(b_key, ())
        if len(a_shape) == 2 and a_shape[0]:  # else the config's rank, and the shapes are refused
            r = a_shape[0]
        else:
            r = b_shape[1] if len(b_shape) == 2 and b_shape[1] else config.rank_of(target.hf_name)
        first = modules[target.parts[0]]
        dt = first.weight.dtype
        a = jax.ShapeDtypeStruct((r, first.in_features), dt)
        scaling = config.scaling(r, config.alpha_of(target.hf_name))
        for part in target.parts:
            per_part[part] = (a, jax.ShapeDtypeStruct((modules[part].out_features, r), dt), scaling)
        planned.append((target, a_key, b_key))
    skeleton = _place(model, per_part, config.lora_dropout)
    refs = {ref.name: ref for ref in param_refs(skeleton)}
    expected = []
    for target, a_key, b_key in planned:
        a_refs = tuple(refs[f"{part}.lora_A"] for part in target.parts)  # one A for every part
        b_refs = tuple(refs[f"{part}.lora_B"] for part in target.parts)  # B split as the base weight
        expected.append(Expected(CheckpointTensor(a_key, a_refs, None, False)))
        expected.append(Expected(CheckpointTensor(b_key, b_refs, target.fused, False)))
    against = f"the projections of {type(model).__name__}"
    return fill(skeleton, dict.fromkeys(reader.keys(), reader), expected, source=directory, against=against, aliases=PEFT_ALIASES)


__all__ = [
    "LoRALinear",
    "LoraConfig",
    "add_adapters",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "read_config",
    "save_adapter",
    "trainable",
    "unmerge",
    "with_dropout",
]
