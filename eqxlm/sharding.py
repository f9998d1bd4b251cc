"""Running past one device with JAX's own SPMD machinery (`Mesh`, `NamedSharding`, jit).

Partition rules are written **once per kind of weight**, over named mesh axes:

- `data`: batch parallelism (activations and caches split by batch; weights replicated);
- `fsdp`: fully sharded data parallelism (batch split like `data`, and every matrix's
  hidden-size dimension split too, gathered by XLA when used);
- `tensor`: tensor (Megatron) parallelism: attention heads and MLP columns split,
  row-parallel output projections reduced by XLA.

A rule maps a regular expression over parameter names (the Hugging Face names, see
`eqxlm.state_dict`) to one mesh axis (or None) per array dimension. An axis that the mesh
does not have is ignored, so the default rules work on any mesh made of these names
(`("data",)`, `("data", "tensor")`, `("fsdp", "tensor")`, ...).

    mesh = eqxlm.sharding.make_mesh((2, 4), ("data", "tensor"))
    model = eqxlm.shard(model, mesh)                      # or from_pretrained(..., mesh=mesh)
    logits = eqx.filter_jit(jax.vmap(model))(eqxlm.sharding.shard_batch(ids, mesh)).logits

Multi-host: call `jax.distributed.initialize()` first on every host, build the mesh over
`jax.devices()` (all hosts' devices), and run the same program everywhere; `from_pretrained`
with a mesh then reads, on each host, only the slices of each tensor that its own devices hold.
"""

import math
import re
from collections.abc import Sequence

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")

#: (name pattern, one mesh axis or None per dimension). First match wins.
DEFAULT_RULES: tuple[tuple[str, tuple], ...] = (
    # embeddings and the head: (vocab, hidden)
    (r"(embed_tokens|word_embeddings|lm_head)\.weight$", ("tensor", "fsdp")),
    # column-parallel projections: (out = heads x head_dim | intermediate, in = hidden)
    (r"(q_proj|k_proj|v_proj|query_key_value|gate_proj|up_proj|dense_h_to_4h)\.weight$", ("tensor", "fsdp")),
    (r"(q_proj|k_proj|v_proj|query_key_value|gate_proj|up_proj|dense_h_to_4h)\.bias$", ("tensor",)),
    # row-parallel projections: (out = hidden, in = heads x head_dim | intermediate)
    (r"(o_proj|self_attention\.dense|down_proj|dense_4h_to_h)\.weight$", ("fsdp", "tensor")),
    (r"(o_proj|self_attention\.dense|down_proj|dense_4h_to_h)\.bias$", (None,)),
    # norms: replicated
    (r"(norm|layernorm|ln_f)\.(weight|bias)$", (None,)),
)


class ShardingError(ValueError):
    """A rule that cannot apply: the message names the parameter, dimension and mesh axis."""


def _spec(name: str, shape: tuple[int, ...], mesh: Mesh, rules) -> P:
    match = next(((pattern, axes) for pattern, axes in rules if re.search(pattern, name)), None)
    if match is None:
        raise ShardingError(f"{name}: no partition rule matches this parameter (add one to `rules`).")
    pattern, axes = match
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
    return P(*spec)


def parameter_specs(model, mesh: Mesh, rules=DEFAULT_RULES) -> dict[str, P]:
    """The `PartitionSpec` of every parameter, by name."""
    from .checkpoint import state_dict

    return {name: _spec(name, tuple(leaf.shape), mesh, rules) for name, leaf in state_dict(model).items()}


def shardings(model, mesh: Mesh, rules=DEFAULT_RULES):
    """A pytree like `model` with a `NamedSharding` at every array leaf (None elsewhere)."""
    from .checkpoint import _path_name

    def leaf_sharding(path, leaf):
        if not (eqx.is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)):
            return None
        return NamedSharding(mesh, _spec(_path_name(path), tuple(leaf.shape), mesh, rules))

    return jax.tree_util.tree_map_with_path(leaf_sharding, model)


def shard(model, mesh: Mesh, rules=DEFAULT_RULES):
    """Place every parameter of `model` on `mesh` according to `rules` (default: the
    data / FSDP / tensor-parallel rules above). Returns the sharded model."""
    params, static = eqx.partition(model, eqx.is_array)
    specs = shardings(params, mesh, rules)
    placed = jax.tree.map(lambda x, s: jax.device_put(x, s), params, specs)
    return eqx.combine(placed, static)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Split the leading (batch) dimension over every batch axis the mesh has."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return NamedSharding(mesh, P(axes or None, *([None] * (ndim - 1))))


def shard_batch(x, mesh: Mesh):
    """Place a batch (leading dimension = batch) over the mesh's batch axes."""
    return jax.device_put(x, batch_sharding(mesh, np.ndim(x)))


def cache_shardings(cache, mesh: Mesh):
    """KV-cache placement: batch over the batch axes, kv heads over `tensor` (when divisible)."""
    batch = tuple(a for a in BATCH_AXES if a in mesh.shape) or None
    tensor = mesh.shape.get("tensor", 1)

    def leaf(x):
        if x.ndim == 4:  # (batch, cache, kv_heads, head_dim)
            heads = "tensor" if "tensor" in mesh.shape and x.shape[2] % tensor == 0 else None
            return NamedSharding(mesh, P(batch, None, heads, None))
        return NamedSharding(mesh, P(batch, *([None] * (x.ndim - 1))))

    return jax.tree.map(leaf, cache)


def memory_per_device(model, mesh: Mesh, rules=DEFAULT_RULES, *, optimizer_states: int = 0) -> dict[str, float]:
    """Bytes of parameters (plus `optimizer_states` same-sized copies, 2 for Adam) on each
    device under `rules`: the largest device's share, and the total. Works on an abstract
    model (`eqx.filter_eval_shape`), so it needs no memory to answer."""
    from .checkpoint import state_dict

    per_device = total = 0
    for name, leaf in state_dict(model).items():
        spec = _spec(name, tuple(leaf.shape), mesh, rules)
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        split = math.prod(mesh.shape[a] for a in spec if a is not None)
        per_device += nbytes / split
        total += nbytes
    factor = 1 + optimizer_states
    return {"bytes_per_device": per_device * factor, "bytes_total": total * factor, "devices": mesh.size}


def describe(model, mesh: Mesh, rules=DEFAULT_RULES, *, optimizer_states: int = 0) -> str:
    """A one-line memory estimate for printing."""
    m = memory_per_device(model, mesh, rules, optimizer_states=optimizer_states)
    axes = " x ".join(f"{n}={s}" for n, s in mesh.shape.items())
    return (
        f"mesh {axes}: {m['bytes_per_device'] / 2**20:,.1f} MiB of parameters"
        f"{' and optimizer state' if optimizer_states else ''} per device "
        f"(of {m['bytes_total'] / 2**20:,.1f} MiB in all)"
    )


def make_mesh(shape: Sequence[int], axes: Sequence[str]) -> Mesh:
    """`jax.make_mesh` with eqxlm's axis names checked and `Auto` axis types: eqxlm places
    parameters and inputs and lets XLA's SPMD partitioner propagate the rest (recent JAX
    defaults `make_mesh` to `Explicit` axes, which would require annotating every gather)."""
    unknown = set(axes) - {"data", "fsdp", "tensor"}
    if unknown:
        raise ValueError(f"mesh axes must be among data, fsdp, tensor; got {sorted(unknown)}.")
    auto = (jax.sharding.AxisType.Auto,) * len(axes)
    return jax.make_mesh(tuple(shape), tuple(axes), axis_types=auto)
