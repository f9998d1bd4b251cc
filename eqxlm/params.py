"""Parameters by name, in one place: names, state dicts, checkpoint key maps, partition specs.

Every array leaf of a model has a **name**: its attribute path, with layer indices where
layers are stacked (`model.layers.3.self_attn.q_proj.weight` in both the unrolled and the
scanned layout, see `eqxlm.nn.LayerStack`). The builder's attribute names are Llama's
checkpoint keys, so for most families names *are* checkpoint keys; a family whose
checkpoints differ says how in its [`KeyMap`][] (renames, fused projections, transposed
weights). `eqxlm.checkpoint` (import/export) and `eqxlm.sharding` both build on this
module and on nothing of each other.
"""

import dataclasses
import itertools
import math
import re
from typing import Any, NamedTuple

import equinox as eqx
import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from .nn import AbstractStacked, AbstractTransparent, LayerStack


class _Stack(NamedTuple):
    """A stacked axis in a name: repetition `r` is named `start + r * period + offset`."""

    start: int
    period: int
    offset: int
    reps: int


class ParamRef(NamedTuple):
    """One named parameter: leaf number `leaf` of `jax.tree_util.tree_leaves(model)`,
    indexed by `index` along its stacked leading axes (empty when unstacked)."""

    name: str
    leaf: int
    index: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: Any


def _is_param(x) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _template(model, path) -> list:
    node, parts, keys, i = model, [], list(path), 0
    while i < len(keys):
        key = keys[i]
        if isinstance(node, LayerStack) and getattr(key, "name", None) == "segments":
            segment, position = keys[i + 1].idx, keys[i + 2].idx
            start, period, reps = node.layout[segment]
            parts.append(_Stack(start, period, position, reps))
            node, i = node.segments[segment][position], i + 3
            continue
        if isinstance(node, AbstractTransparent) and getattr(key, "name", None) == node.transparent_field:
            node, i = getattr(node, node.transparent_field), i + 1
            continue
        if isinstance(node, AbstractStacked) and getattr(key, "name", None) == node.stacked_field:
            parts.append(key.name)
            parts.append(_Stack(0, 1, 0, -1))  # the count comes from the leaf's shape
            node, i = getattr(node, node.stacked_field), i + 1
            continue
        if isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
            node = getattr(node, key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
            node = node[key.idx]
        else:
            raise TypeError(f"unexpected pytree key {key!r} in a model")
        i += 1
    return parts


def param_refs(model) -> list[ParamRef]:
    """Every parameter of `model` (concrete or abstract) by name, in leaf order."""
    leaves = jax.tree_util.tree_leaves_with_path(model)
    refs = []
    for leaf_number, (path, leaf) in enumerate(leaves):
        if not _is_param(leaf):
            continue
        parts = _template(model, path)
        stacks = [p for p in parts if isinstance(p, _Stack)]
        counts = [s.reps if s.reps >= 0 else leaf.shape[k] for k, s in enumerate(stacks)]
        for index in itertools.product(*(range(c) for c in counts)):
            it = iter(index)
            name = ".".join(str(p.start + next(it) * p.period + p.offset) if isinstance(p, _Stack) else p for p in parts)
            refs.append(ParamRef(name, leaf_number, index, tuple(leaf.shape[len(index) :]), leaf.dtype))
    return refs


def state_dict(model) -> dict[str, Any]:
    """Every parameter by name (stacked leaves sliced per layer). For an abstract model
    (`eqx.filter_eval_shape`) the values are `jax.ShapeDtypeStruct`s."""
    leaves = jax.tree_util.tree_leaves(model)
    out = {}
    for ref in param_refs(model):
        leaf = leaves[ref.leaf]
        out[ref.name] = jax.ShapeDtypeStruct(ref.shape, ref.dtype) if isinstance(leaf, jax.ShapeDtypeStruct) else leaf[ref.index]
    return out


def parameter_count(model) -> int:
    """The number of parameters (array elements) in `model`."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))


# -- checkpoint key maps ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Fused:
    """Several parameters stored as one checkpoint tensor, concatenated along axis 0.

    `into` replaces the parts' module name (`q_proj`, `k_proj`, `v_proj` -> `query_key_value`).
    With `heads`, rows are interleaved **per head**, `(heads, len(parts), head_dim)` (BLOOM,
    GPT-NeoX); otherwise the parts are stacked whole (`[Q; K; V]`: GPT-2, Phi-3).
    """

    into: str
    parts: tuple[str, ...]
    heads: int | None = None

    def join(self, arrays: list[np.ndarray]) -> np.ndarray:
        if self.heads is None:
            return np.concatenate(arrays, axis=0)
        per_head = [a.reshape(self.heads, -1, *a.shape[1:]) for a in arrays]
        stacked = np.stack(per_head, axis=1)
        return stacked.reshape(-1, *arrays[0].shape[1:])

    def split(self, array: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
        if self.heads is None:
            bounds = np.cumsum([s[0] for s in shapes])[:-1]
            return [np.ascontiguousarray(a) for a in np.split(array, bounds, axis=0)]
        grouped = array.reshape(self.heads, len(self.parts), -1, *array.shape[1:])
        return [np.ascontiguousarray(grouped[:, i].reshape(shape)) for i, shape in enumerate(shapes)]


class CheckpointTensor(NamedTuple):
    """One checkpoint tensor: its name, the parameters it holds, how they are combined."""

    name: str
    parts: tuple[ParamRef, ...]
    fused: Fused | None
    transposed: bool

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self.parts[0].shape
        if self.fused is not None:
            shape = (sum(p.shape[0] for p in self.parts), *shape[1:])
        return tuple(reversed(shape)) if self.transposed else shape

    def join(self, arrays: list[np.ndarray]) -> np.ndarray:
        """Parameter values -> the checkpoint tensor."""
        array = arrays[0] if self.fused is None else self.fused.join(arrays)
        return np.ascontiguousarray(array.T) if self.transposed else array

    def split(self, array: np.ndarray) -> list[np.ndarray]:
        """The checkpoint tensor -> parameter values."""
        if self.transposed:
            array = np.ascontiguousarray(array.T)
        return [array] if self.fused is None else self.fused.split(array, [p.shape for p in self.parts])


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """How a family's parameter names map onto its checkpoint keys.

    - `renames`: `(pattern, replacement)` pairs applied in order with `re.sub` to every name;
    - `fused`: parameters stored together (see [`Fused`][]);
    - `transposed`: a pattern over checkpoint names whose 2-D weights are stored `(in, out)`
      (GPT-2's `Conv1D`);
    - `aliases`: `(pattern, replacement)` tried on a checkpoint name that matches nothing,
      for other spellings of the same checkpoint (BLOOM saved without `transformer.`);
    - `ignored`: a pattern over checkpoint names that are buffers transformers recomputes
      (rotary `inv_freq`, GPT-2's causal-mask `attn.bias`), skipped on import.
    """

    renames: tuple[tuple[str, str], ...] = ()
    fused: tuple[Fused, ...] = ()
    transposed: str | None = None
    aliases: tuple[tuple[str, str], ...] = ()
    ignored: str | None = r"(^|\.)rotary_emb\.inv_freq$"

    def rename(self, name: str) -> str:
        for pattern, replacement in self.renames:
            name = re.sub(pattern, replacement, name)
        return name

    def checkpoint_tensors(self, refs: list[ParamRef]) -> list[CheckpointTensor]:
        """The checkpoint tensors of a model with parameters `refs`, in `refs`' order."""
        by_name = {r.name: r for r in refs}
        grouped: dict[str, tuple[tuple[ParamRef, ...], Fused]] = {}
        member: set[str] = set()
        for fused in self.fused:
            pattern = re.compile(rf"^(.*\.)?({'|'.join(map(re.escape, fused.parts))})\.(weight|bias)$")
            for ref in refs:
                match = pattern.match(ref.name)
                if not match or match.group(2) != fused.parts[0]:
                    continue
                names = [f"{match.group(1) or ''}{part}.{match.group(3)}" for part in fused.parts]
                if all(n in by_name for n in names):
                    grouped[ref.name] = (tuple(by_name[n] for n in names), fused)
                    member.update(names)
        out, seen = [], {}
        for ref in refs:
            if ref.name in grouped:
                parts, fused = grouped[ref.name]
                base = re.sub(rf"(^|\.){re.escape(fused.parts[0])}\.(weight|bias)$", rf"\g<1>{fused.into}.\2", ref.name)
            elif ref.name in member:
                continue
            else:
                parts, fused, base = (ref,), None, ref.name
            name = self.rename(base)
            if name in seen:
                raise ValueError(f"key map: {seen[name]} and {ref.name} both map to checkpoint key {name}.")
            seen[name] = ref.name
            transposed = self.transposed is not None and len(parts[0].shape) == 2 and re.search(self.transposed, name) is not None
            out.append(CheckpointTensor(name, parts, fused, transposed))
        return out


# -- partition specs -------------------------------------------------------------------------
#: (name pattern, one mesh axis or None per dimension of the per-layer tensor). First match
#: wins. Written once per kind of weight over the builder's (Llama's) names.
DEFAULT_RULES: tuple[tuple[str, tuple], ...] = (
    # embeddings and the head: (vocab, hidden)
    (r"(embed_tokens|lm_head)\.weight$", ("tensor", "fsdp")),
    (r"lm_head\.bias$", ("tensor",)),
    (r"embed_positions\.weight$", (None, "fsdp")),
    # mixture of experts: a rule with one more axis than the per-expert tensor names the
    # stacked experts axis first (expert parallelism: each device holds whole experts);
    # the router and the shared expert's gate are replicated
    (r"experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$", ("tensor", None, "fsdp")),
    (r"(^|\.)(gate|shared_expert_gate)\.weight$", (None, None)),
    # LoRA adapters (`eqxlm.lora`): A `(r, in)` split as its base weight's input dimension,
    # B `(out, r)` as its output dimension, the rank unsplit (an expert's adapters follow it)
    (r"experts\.\d+\.(gate_proj|up_proj|down_proj)\.lora_A$", ("tensor", None, "fsdp")),
    (r"experts\.\d+\.(gate_proj|up_proj|down_proj)\.lora_B$", ("tensor", None, None)),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.lora_A$", (None, "fsdp")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.lora_B$", ("tensor", None)),
    (r"(o_proj|down_proj)\.lora_A$", (None, "tensor")),
    (r"(o_proj|down_proj)\.lora_B$", ("fsdp", None)),
    # column-parallel projections: (out = heads x head_dim | intermediate, in = hidden)
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$", ("tensor", "fsdp")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.bias$", ("tensor",)),
    # row-parallel projections: (out = hidden, in = heads x head_dim | intermediate)
    (r"(o_proj|down_proj)\.weight$", ("fsdp", "tensor")),
    (r"(o_proj|down_proj)\.bias$", (None,)),
    # norms: replicated
    (r"(norm|layernorm)\.(weight|bias)$", (None,)),
)


class ShardingError(ValueError):
    """A rule that cannot apply: the message names the parameter, dimension and mesh axis."""


def partition_spec(name: str, shape: tuple[int, ...], mesh, rules, stacked: int = 0, stacked_shape: tuple[int, ...] = ()) -> P:
    """The `PartitionSpec` of parameter `name` (per-layer `shape`) under `rules`, with
    `stacked` leading stacked axes left unsplit, except that a rule with one axis more than
    `shape` splits the innermost stacked axis (the experts axis; sizes `stacked_shape`)
    over its first mesh axis. Without stacked axes that first axis is dropped."""
    match = next(((pattern, axes) for pattern, axes in rules if re.search(pattern, name)), None)
    if match is None:
        raise ShardingError(f"{name}: no partition rule matches this parameter (add one to `rules`).")
    pattern, axes = match
    lead = [None] * stacked
    if len(axes) == len(shape) + 1:
        inner, axes = axes[0], axes[1:]
        if stacked and inner is not None and inner in mesh.shape:
            size = stacked_shape[-1] if stacked_shape else None
            if size is not None and size % mesh.shape[inner]:
                raise ShardingError(
                    f"{name}: the stacked experts axis (size {size}) is not divisible by mesh axis {inner!r} "
                    f"(size {mesh.shape[inner]}); change the mesh or the rule {pattern!r}."
                )
            lead[-1] = inner
    if len(axes) != len(shape):
        raise ShardingError(f"{name}: rule {pattern!r} names {len(axes)} dimensions, the parameter has {len(shape)}.")
    spec = []
    for dim, (axis, size) in enumerate(zip(axes, shape, strict=True)):
        if axis is None or axis not in mesh.shape:
            spec.append(None)
            continue
        if size % mesh.shape[axis]:
            raise ShardingError(
                f"{name}: dimension {dim} (size {size}) is not divisible by mesh axis {axis!r} "
                f"(size {mesh.shape[axis]}); change the mesh or the rule {pattern!r}."
            )
        spec.append(axis)
    if any(a is not None and a in lead for a in spec):  # one mesh axis splits one dimension
        spec = [None if a in lead else a for a in spec]
    return P(*lead, *spec)


def leaf_specs(model, mesh, rules) -> dict[int, P]:
    """The `PartitionSpec` of every parameter leaf, by leaf number (a stacked leaf takes the
    spec of its first layer, its stacked axes unsplit)."""
    specs: dict[int, P] = {}
    leaves = jax.tree_util.tree_leaves(model)
    for ref in param_refs(model):
        if ref.leaf not in specs:
            stacked_shape = tuple(leaves[ref.leaf].shape[: len(ref.index)])
            specs[ref.leaf] = partition_spec(
                ref.name, ref.shape, mesh, rules, stacked=len(ref.index), stacked_shape=stacked_shape
            )
    return specs
