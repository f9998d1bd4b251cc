"""Look inside a model: capture and patch activations, as pytree edits.

    hooked = inspect.capture(model, ["model.layers.1.self_attn.probs", "model.layers.0.resid_post"])
    out, acts = inspect.run(hooked, input_ids)            # acts: {name: array}
    patched = inspect.patch(model, "model.layers.0.mlp", value=acts_from_another_prompt)
    patched(input_ids).logits                              # an ordinary model; jit, vmap, grad, generate

**Names.** A module is named by its parameter path (`model.layers.3.self_attn`,
`model.layers.3.mlp.down_proj`, the same in the scanned layout), by its checkpoint name
for families whose key map renames it (`transformer.h.3.self_attention` on BLOOM), or by an
`eqx.tree_at`-style `where` function. A module's name means its output; `name:input` its
(first) input. The points that are not module outputs:

| name | value |
|---|---|
| `model.layers.i.resid_pre` / `resid_post` | the residual stream entering / leaving layer `i` (`seq hidden`) |
| `model.layers.i.resid_mid` | between attention and MLP (sequential layers) |
| `model.layers.i.self_attn.q` / `k` / `v` | after rotary, this block only (`seq heads head_dim`) |
| `model.layers.i.self_attn.probs` | attention probabilities per head (`heads seq kv_seq`; capture only) |
| `model.layers.i.self_attn.z` | each head's output before `o_proj` (`seq heads head_dim`) |
| `model.layers.i.mlp.router_logits` | a mixture of experts' router logits (`seq experts`; patching them re-routes) |
| `model.layers.i.mlp.routing_weights` / `selected_experts` | the top-k weights and expert indices (`seq k`) |
| `<path>.<point>` | a point a part of the user's own declares (`eqxlm.nn.AbstractTapped`, `eqxlm.nn.tap`) |

**Patches** replace a value (`value=`), add to it (`add=`, broadcasting: a steering vector
of shape `(hidden,)` works at every step of `eqxlm.generate`), or apply a function (`fn=`).

**Design: a wrapper module placed by `eqx.tree_at`, with a trace-time output channel.**
A hook is a [`Hook`][] module put around its target, as `eqxlm.training.Remat` is: it is
transparent to parameter names, carries its configuration as static fields and its patch
arrays as leaves, so a hooked model is an ordinary pytree that `eqx.filter_jit`,
`jax.vmap`, `jax.grad`, `eqxlm.generate` and `eqxlm.shard` take as they are, and
`unhook` removes it. Points inside a module (queries, probabilities, per-head outputs, the
middle of the residual stream) are reached by the hook passing a static `taps` callback to
the module it wraps, which hands each point's value to `eqxlm.nn.tap` (a part of the user's
own declares its points the same way: `eqxlm.nn.AbstractTapped`); without a hook that
argument is None and the code path is the unhooked one, so **an unhooked model traces to
exactly the same jaxpr** (tested). Captured values leave through a collector that [`run`][]
opens while it traces the call (nothing is mutated at run time; under `lax.scan` the scanned
layers return the captures as scan outputs, see `eqxlm.nn._taps`), which is why captures need `run` while patches need
nothing, and why `run` goes inside a transformation, never around one begun within it
(that is refused: its captures could not leave it). We chose this over threading named hook
points through every call signature (TransformerLens' style) because that changes every
module's outputs and every caller, and over a mutable registry (PyTorch hooks) because a
registry does not survive `jit`.

**Inside `eqxlm.generate`.** Patches are part of the model, so they apply at every step.
Captures come back through `run` with generate as the function:

    tokens, acts = inspect.run(lambda m, ids: eqxlm.generate(m, ids, max_new_tokens=8), hooked, ids)
    acts["model.layers.1.resid_pre"]           # the prefill: (batch, prompt, hidden)
    acts["model.layers.1.resid_pre@decode"]    # each decode step: (batch, max_new_tokens - 1, 1, hidden)

(the decode loop writes each step's values into a buffer it carries, so nothing leaves the
compiled loop but arrays). Limits: patching `probs` is refused (they are computed inside the fused
attention); modules called one token at a time inside the MLP (`mlp.down_proj`) are patched
per token (`fn` sees one token's vector; `value`/`add` have one token's shape, e.g. a neuron mask),
so such a hook makes its MLP run token by token: the logits then match the unhooked model's to
float32 rounding (one product per token instead of one per sequence). `hook_names(model)` lists
every name that can be hooked: norms, embeddings and q/k norms included; not the modules inside
a mixture of experts (hook the MLP or its router points), a position scheme (capture `q`/`k`),
or Cohere's per-head-weight q/k norms, each refused by name if asked for.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from . import module_paths as paths
from .nn import (
    AbstractDecoderLayer,
    AbstractPositionScheme,
    AbstractSequenceWise,
    AbstractTapped,
    AbstractTokenAxes,
    AbstractTransparent,
    Attention,
    LayerStack,
    SparseMoE,
    _taps,
    linear,
    project,
)

ROUTER_POINTS = SparseMoE.tap_points
LAYER_POINTS = {"resid_pre": "input", "resid_post": "output", "resid_mid": "resid_mid"}


@dataclasses.dataclass(frozen=True)
class PatchSpec:
    """One patch: at `point`, `mode` `"replace"`, `"add"` or `"fn"` (with `fn`); `value`
    (for replace/add) is leaf number `slot` of the hook's `values`."""

    point: str
    mode: str
    fn: Callable | None = None
    slot: int = -1


@dataclasses.dataclass(frozen=True)
class HookConfig:
    """A hook's static part: `captures` `((point, row, name), ...)` (row -1 unstacked, `r` =
    repetition `r` of a scanned segment; `name` the capture's name); `patches`
    `((PatchSpec, row), ...)`; `stacked` (inside a scanned segment); `token_wise` (called one
    token at a time by its parent); `token_scope` (an MLP whose token-wise hooks capture)."""

    captures: tuple[tuple[str, int, str], ...] = ()
    patches: tuple[tuple[PatchSpec, int], ...] = ()
    stacked: bool = False
    token_wise: bool = False
    token_scope: bool = False


class Hook(AbstractTransparent, AbstractSequenceWise):
    """A module with captures and patches at its input, output and internal points.

    `module` is the wrapped module (transparent to parameter names); `values` the patch
    arrays (with a leading repetition axis inside a scanned segment); `config` static."""

    module: Any
    values: tuple[Any, ...]
    config: HookConfig = eqx.field(static=True)
    transparent_field: ClassVar[str] = "module"

    def __getattr__(self, name):  # reads through to the wrapped module (`self_attn.sliding_window`)
        if name.startswith("__") or name in ("module", "values", "config"):
            raise AttributeError(name)
        return getattr(self.module, name)

    def _apply(self, point: str, x):
        config = self.config
        for spec, row in config.patches:
            if spec.point != point:
                continue
            value = None if spec.slot < 0 else self.values[spec.slot]
            if spec.mode == "replace":
                new = jnp.broadcast_to(value, x.shape).astype(x.dtype)
            elif spec.mode == "add":
                new = x + jnp.broadcast_to(value, x.shape).astype(x.dtype)
            else:
                new = spec.fn(x)
            if config.stacked:  # a scanned segment: `values[0]` holds this repetition's index
                new = jnp.where(self.values[0] == row, new, x)
            x = new
        rows = tuple((label, row) for (p, row, label) in config.captures if p == point)
        if rows:
            _taps.record(rows, x)
        return x

    def _call_inner(self, x, *args, **kwargs):
        inner_points = tuple(
            sorted({c[0] for c in self.config.captures} | {s.point for s, _ in self.config.patches} - {"input", "output"})
        )
        inner_points = tuple(p for p in inner_points if p not in ("input", "output"))
        module, config = self.module, self.config
        if inner_points:
            taps = _Taps(self, inner_points)
            whole = (AbstractSequenceWise, AbstractTokenAxes, Attention, AbstractDecoderLayer)
            if config.token_wise or args or kwargs or isinstance(module, whole):
                return module(x, *args, taps=taps, **kwargs)
            return _per_token(lambda xt: module(xt, taps=taps), x)  # a part called one token at a time
        if config.token_wise and not (args or kwargs):  # one token (a projection inside an MLP)
            return project(module, x)
        if config.token_wise or args or kwargs or isinstance(module, (Attention, AbstractDecoderLayer)):
            return module(x, *args, **kwargs)
        if isinstance(module, eqx.nn.Linear):  # called through `eqxlm.nn.linear`, on the whole sequence
            return linear(module, x)
        if isinstance(module, eqx.nn.Embedding):  # called by the model's `embed` with the token ids
            return module.weight[x]
        if config.token_scope:  # never a sequence-wise MLP (`_add` refuses hooks inside one)
            return _per_token(module, x)  # hooks inside run one token at a time, as their patches are given
        return _taps.each_token(module, x)

    def __call__(self, x, *args, **kwargs):
        x = self._apply("input", x)
        out = self._call_inner(x, *args, **kwargs)
        if isinstance(out, tuple):
            return (self._apply("output", out[0]), *out[1:])
        return self._apply("output", out)


def _per_token(fn, x):
    """`jax.vmap(fn)(x)`, the captures of the hooks `fn` runs leaving the vmap as its outputs."""
    if not _taps.active():
        return jax.vmap(fn)(x)
    keys: list = []

    def one(xt):
        with _taps.collecting() as got:
            y = fn(xt)
        keys[:] = list(got)
        return y, tuple(got[k] for k in keys)

    y, captured = jax.vmap(one)(x)
    for key, value in zip(keys, captured, strict=True):
        _taps.record(key, value)
    return y


class _Taps:
    """The static `taps` callback a hook hands to the module it wraps."""

    def __init__(self, hook: Hook, points: tuple[str, ...]):
        self.hook, self.points = hook, points

    def __call__(self, point: str, x):
        return self.hook._apply(point, x) if point in self.points else x


# -- naming ------------------------------------------------------------------------------
def _translate(model, path: str, names: dict[str, Any]) -> str:
    """An eqxlm module name for `path` (an eqxlm name, or a checkpoint name via the key map)."""
    if path in names:
        return path
    key_map = model.key_map() if hasattr(model, "key_map") else None
    if key_map is not None:
        for ours in names:
            if ours and key_map.rename(ours + ".weight")[: -len(".weight")] == path:
                return ours
        for fused in key_map.fused:
            if path.endswith("." + fused.into) or key_map.rename(path + ".weight").endswith(f".{fused.into}.weight"):
                raise ValueError(
                    f"{path}: eqxlm holds the fused checkpoint projection {fused.into!r} as {', '.join(fused.parts)}; hook those."
                )
    close = [n for n in names if n.split(".")[-1] == path.split(".")[-1]][:3]
    raise ValueError(
        f"no module named {path!r} in {type(model).__name__}" + (f" (did you mean {', '.join(close)}?)" if close else ".")
    )


def _points(node) -> tuple[str, ...]:
    """The internal points `node` declares (`eqxlm.nn.AbstractTapped`)."""
    return node.tap_points if isinstance(node, AbstractTapped) else ()


# eqxlm's parts with points, offered in errors also to a model that has none of them
_TAPPED = {Attention: "an attention module", SparseMoE: "a mixture of experts"}


def _parse(model, name: str) -> tuple[str, str]:
    """`(module name, point)` for a hook name."""
    names = paths.module_paths(model)
    point = "output"
    if name.endswith(":input"):
        name, point = name[: -len(":input")], "input"
    head, _, last = name.rpartition(".")
    if last in LAYER_POINTS and point == "output":
        module = _translate(model, head, names)
        node = names[module]
        if not isinstance(node, AbstractDecoderLayer):
            raise ValueError(f"{name}: {last!r} is a point of a decoder layer, and {module} is a {type(node).__name__}.")
        if LAYER_POINTS[last] not in ("input", "output", *_points(node)):  # a parallel layer has no `resid_mid`
            raise ValueError(f"{name}: {module} is a {type(node).__name__}, which has no point {last!r}.")
        return module, LAYER_POINTS[last]
    tapped = {type(n) for n in names.values() if isinstance(n, AbstractTapped)} | set(_TAPPED)
    kinds = sorted({_TAPPED.get(cls, f"a {cls.__name__}") for cls in tapped if last in cls.tap_points})
    if kinds and point == "output" and name not in names:
        module = _translate(model, head, names)
        if last not in _points(names[module]):
            kind = type(names[module]).__name__
            raise ValueError(f"{name}: {last!r} is a point of {' / '.join(kinds)}, and {module} is a {kind}.")
        return module, last
    return _translate(model, name, names), point


def _name_of(model, where: Callable) -> str:
    target = where(model)
    for name, node in paths.module_paths(model).items():
        if node is target:
            return name
    raise ValueError("`where` must return a module of the model (for scanned layers, name it by its path instead).")


# -- placing hooks -----------------------------------------------------------------------
def _add(model, name: str | None, where, point_override, captures: bool, patch_spec=None, value=None):
    if (name is None) == (where is None):
        raise ValueError("name a module by `name` or by `where`, not both and not neither.")
    if where is not None:
        module_name, point = _name_of(model, where), point_override or "output"
    else:
        module_name, point = _parse(model, name)
    steps, reps, row, parent_mlp = paths.locate(model, module_name)
    token_wise = parent_mlp is not None
    if token_wise and not captures and value is not None and jnp.ndim(value) > 1:
        raise ValueError(
            f"{module_name}: modules inside the MLP run one token at a time, so a patch applies per token: give "
            f"`value`/`add` one token's shape (got {jnp.shape(value)}), use `fn=`, or patch the MLP's input or output."
        )
    parent = paths.getter(steps[:parent_mlp])(model) if token_wise else None
    if token_wise and isinstance(parent.module if isinstance(parent, Hook) else parent, AbstractSequenceWise):
        raise ValueError(f"{module_name}: the MLP takes the whole sequence (a mixture of experts); hook the MLP itself.")
    getter = paths.getter(steps)
    target = getter(model)
    if isinstance(target, AbstractPositionScheme):
        raise ValueError(
            f"{module_name}: a position scheme is applied to q and k (rotary) or added to the scores (ALiBi), "
            "not called on activations; capture the attention's `q` / `k` / `probs` points."
        )
    if _per_head_weights(paths.module_paths(model), module_name):
        raise ValueError(
            f"{module_name}: this norm holds one weight per head and runs inside the attention's per-head "
            "vmap, so it cannot be hooked; capture the attention's `q` / `k` points (after the norm and rotary)."
        )
    stacked = reps > 0
    hook = target if isinstance(target, Hook) else Hook(target, (), HookConfig(stacked=stacked, token_wise=token_wise))
    config, values = hook.config, list(hook.values)
    if stacked and not values:
        values = [jnp.arange(reps, dtype=jnp.int32)]  # the repetition index, sliced by the scan
    if captures:
        label = name if name is not None else module_name + {"output": "", "input": ":input"}.get(point, "." + point)
        config = dataclasses.replace(config, captures=tuple(dict.fromkeys((*config.captures, (point, row, label)))))
    else:
        slot = -1
        if value is not None:
            value = jnp.asarray(value)
            values.append(jnp.broadcast_to(value, (reps, *value.shape)) if stacked else value)
            slot = len(values) - 1
        spec = dataclasses.replace(patch_spec, point=point, slot=slot)
        config = dataclasses.replace(config, patches=(*config.patches, (spec, row)))
    model = eqx.tree_at(getter, model, Hook(hook.module, tuple(values), config))
    if token_wise:  # the MLP around it opens a scope per token, so the captures leave its vmap
        mlp_getter = paths.getter(steps[:parent_mlp])
        mlp = mlp_getter(model)
        if isinstance(mlp, Hook):
            new = Hook(mlp.module, mlp.values, dataclasses.replace(mlp.config, token_scope=True))
        else:
            new = Hook(
                mlp, (jnp.arange(reps, dtype=jnp.int32),) if stacked else (), HookConfig(stacked=stacked, token_scope=True)
            )
        model = eqx.tree_at(mlp_getter, model, new)
    return model


def capture(model, names: str | Sequence[str] = (), *, where: Callable | None = None, point: str = "output"):
    """`model` with captures at `names` (or at the module `where(model)` returns, its
    `point` `"output"` or `"input"`). Run it with [`run`][] to get them back."""
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        model = _add(model, name, None, None, captures=True)
    if where is not None:
        model = _add(model, None, where, point, captures=True)
    return model


def patch(
    model,
    name: str | None = None,
    *,
    where: Callable | None = None,
    point: str = "output",
    value=None,
    add=None,
    fn: Callable | None = None,
):
    """`model` with the activation `name` (or `where(model)`'s `point`) replaced by `value`,
    increased by `add` (broadcast), or mapped by `fn`. Exactly one of the three."""
    given = [x is not None for x in (value, add, fn)]
    if sum(given) != 1:
        raise ValueError("patch: give exactly one of `value`, `add` and `fn`.")
    if name is not None and name.endswith(".probs"):
        raise ValueError(f"{name}: attention probabilities can be captured, not patched (patch q, k, v or z).")
    mode = "replace" if value is not None else "add" if add is not None else "fn"
    return _add(
        model, name, where, point, captures=False, patch_spec=PatchSpec("", mode, fn), value=value if value is not None else add
    )


def router_points(model, points: Sequence[str] = ROUTER_POINTS) -> list[str]:
    """The router capture names (`points` of [`ROUTER_POINTS`][]) of every mixture-of-experts
    layer of `model`, in layer order; dense layers (Qwen2-MoE's `mlp_only_layers`) have none.

        _, acts = inspect.run(inspect.capture(model, inspect.router_points(model)), ids)
    """
    names = [name for name, node in paths.module_paths(model).items() if isinstance(node, SparseMoE)]
    names.sort(key=lambda n: [int(t) if t.isdigit() else -1 for t in n.split(".")])  # layer order (scanned too)
    return [f"{name}.{point}" for name in names for point in points]


def run(model, *args, **kwargs) -> tuple[Any, dict[str, jax.Array]]:
    """Call `model(*args, **kwargs)` and return `(output, captures)`, captures by name.
    A pure function of its arguments: `eqx.filter_jit(inspect.run)`, `jax.vmap`, `jax.grad`.
    Put it inside a transformation, not the transformation inside it: a capture recorded in a
    trace begun within `run` (`run(jax.vmap(hooked), batch)`) raises rather than leak a tracer."""
    with _taps.collecting() as got:
        out = model(*args, **kwargs)
    captures = {}
    for key, value in got.items():
        for name, row in key:
            captures[name] = value if row < 0 else value[row]
    return out, captures


def unhook(model):
    """`model` without any hook."""
    is_hook = lambda x: isinstance(x, Hook)  # noqa: E731

    return jax.tree.map(lambda x: unhook(x.module) if is_hook(x) else x, model, is_leaf=is_hook)


def _per_head_weights(names: dict[str, Any], module_name: str) -> bool:
    """Whether `module_name` is an attention's q/k norm with one weight per head (Cohere);
    `names` from `module_paths`."""
    parent, _, last = module_name.rpartition(".")
    if last not in ("q_norm", "k_norm"):
        return False
    attention = names.get(parent)
    return isinstance(attention, Attention) and attention.qk_norm == "head_weights"


def hook_names(model) -> list[str]:
    """Every module name and point name `model` offers (each can be captured or patched):
    the points a module declares (`eqxlm.nn.AbstractTapped`) follow its name; inside a
    mixture of experts, which runs on the whole sequence, only its router points."""
    out = []
    names = paths.module_paths(model)
    # the modules inside an MLP that takes the whole sequence (a mixture of experts) are refused by `_add`
    whole = tuple(n + "." for n, node in names.items() if n.split(".")[-1] == "mlp" and isinstance(node, AbstractSequenceWise))
    for name, node in names.items():
        if not name or isinstance(node, (LayerStack, AbstractPositionScheme)) or name.startswith(whole):
            continue
        if _per_head_weights(names, name):
            continue
        out.append(name)
        # every layer's input and output; `resid_mid` where the layer declares it (not a parallel one)
        points = ("resid_pre", "resid_post", *_points(node)) if isinstance(node, AbstractDecoderLayer) else _points(node)
        out += [f"{name}.{p}" for p in points]
    return out


__all__ = ["Hook", "capture", "hook_names", "patch", "run", "unhook"]
