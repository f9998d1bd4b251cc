"""Running past one device with JAX's own SPMD machinery (`Mesh`, `NamedSharding`, jit).

Partition rules are written **once per kind of weight**, over named mesh axes:

- `data`: batch parallelism (activations and caches split by batch; weights replicated);
- `fsdp`: fully sharded data parallelism (batch split like `data`, and every matrix's
  hidden-size dimension split too, gathered by XLA when used);
- `tensor`: tensor (Megatron) parallelism: attention heads and MLP columns split,
  row-parallel output projections reduced by XLA.

A rule maps a regular expression over parameter names (see `eqxlm.params`; the builder's
names are Llama's checkpoint keys for every family) to one mesh axis (or None) per
dimension of the per-layer tensor; stacked (scanned) layers keep their layer axis unsplit.
Each model says which rules it uses (`model.partition_rules()`, the family's knowledge);
the defaults are `eqxlm.params.DEFAULT_RULES`. An axis that the mesh
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
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .params import DEFAULT_RULES, ShardingError, leaf_specs, param_refs, partition_spec

BATCH_AXES = ("data", "fsdp")

__all__ = [
    "DEFAULT_RULES",
    "ShardingError",
    "batch_sharding",
    "cache_shardings",
    "describe",
    "make_mesh",
    "memory_per_device",
    "parameter_specs",
    "shard",
    "shard_batch",
    "shardings",
]


def _rules(model, rules):
    if rules is not None:
        return rules
    return model.partition_rules() if hasattr(model, "partition_rules") else DEFAULT_RULES


def parameter_specs(model, mesh: Mesh, rules=None) -> dict[str, P]:
    """The `PartitionSpec` of every parameter, by name (per layer, as a checkpoint holds it)."""
    rules = _rules(model, rules)
    return {ref.name: partition_spec(ref.name, ref.shape, mesh, rules) for ref in param_refs(model)}


def shardings(model, mesh: Mesh, rules=None):
    """A pytree like `model` with a `NamedSharding` at every parameter leaf (None elsewhere)."""
    specs = leaf_specs(model, mesh, _rules(model, rules))
    leaves, treedef = jax.tree_util.tree_flatten(model)
    return jax.tree_util.tree_unflatten(
        treedef, [NamedSharding(mesh, specs[i]) if i in specs else None for i in range(len(leaves))]
    )


def shard(model, mesh: Mesh, rules=None):
    """Place every parameter of `model` on `mesh` according to `rules` (default: the
    model's `partition_rules()`). Returns the sharded model."""
    targets = shardings(model, mesh, rules)
    return jax.tree.map(lambda x, s: x if s is None else jax.device_put(x, s), model, targets, is_leaf=lambda x: x is None)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Split the leading (batch) dimension over every batch axis the mesh has."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return NamedSharding(mesh, P(axes or None, *([None] * (ndim - 1))))


def shard_batch(x, mesh: Mesh):
    """Place a batch (leading dimension = batch) over the mesh's batch axes."""
    return jax.device_put(x, batch_sharding(mesh, np.ndim(x)))


def cache_shardings(cache, mesh: Mesh):
    """KV-cache placement: batch over the batch axes, kv heads over `tensor` (when divisible).
    Key/value arrays are `(batch, [layers,] cache, kv_heads, head_dim)`."""
    batch = tuple(a for a in BATCH_AXES if a in mesh.shape) or None
    tensor = mesh.shape.get("tensor", 1)

    def leaf(x):
        if x.ndim >= 4:
            heads = "tensor" if "tensor" in mesh.shape and x.shape[-2] % tensor == 0 else None
            return NamedSharding(mesh, P(batch, *([None] * (x.ndim - 3)), heads, None))
        return NamedSharding(mesh, P(batch, *([None] * (x.ndim - 1))))

    return jax.tree.map(leaf, cache)


def memory_per_device(model, mesh: Mesh, rules=None, *, optimizer_states: int = 0) -> dict[str, float]:
    """Bytes of parameters (plus `optimizer_states` same-sized copies, 2 for Adam) on each
    device under `rules`: the largest device's share, and the total. Works on an abstract
    model (`eqx.filter_eval_shape`), so it needs no memory to answer."""
    rules = _rules(model, rules)
    per_device = total = 0
    for ref in param_refs(model):
        spec = partition_spec(ref.name, ref.shape, mesh, rules)
        nbytes = math.prod(ref.shape) * np.dtype(ref.dtype).itemsize
        split = math.prod(mesh.shape[a] for a in spec if a is not None)
        per_device += nbytes / split
        total += nbytes
    factor = 1 + optimizer_states
    return {"bytes_per_device": per_device * factor, "bytes_total": total * factor, "devices": mesh.size}


def describe(model, mesh: Mesh, rules=None, *, optimizer_states: int = 0) -> str:
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
