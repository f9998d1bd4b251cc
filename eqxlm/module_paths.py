"""Modules by path: the names `eqxlm.inspect` and `eqxlm.lora` give the modules of a model
tree, and how to reach one for `eqx.tree_at`.

A module's **path** is its attribute path with sequence indices (`model.layers.3.self_attn.q_proj`),
as `eqxlm.params` names parameters, so a path plus `.weight` is a parameter name. Layer `i`
of an `eqxlm.nn.LayerStack` is `layers.i` in the scanned layout too, although its arrays
live in a stacked block shared by every repetition of its segment. A wrapper that declares a
An `eqxlm.nn.AbstractTransparent` wrapper (an `eqxlm.inspect.Hook`, `eqxlm.training.Remat`) is
not part of any path: the path names what it wraps.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx

from .nn import AbstractTransparent, LayerStack


def _transparent(node) -> str | None:
    return node.transparent_field if isinstance(node, AbstractTransparent) else None


def module_paths(model, prefix: str = "") -> dict[str, Any]:
    """Every module of `model` by its path (`""` or `prefix` for `model` itself). Scanned
    layers are named one by one (`layers.0` ... `layers.n-1`), each mapping to the stacked
    block that holds it, which is not sliced."""
    out: dict[str, Any] = {}

    def walk(node, names):
        while _transparent(node) is not None:
            node = getattr(node, _transparent(node))
        if not isinstance(node, eqx.Module):
            return
        for name in names:
            out[name] = node
        if isinstance(node, LayerStack):
            for (start, period, reps), block in zip(node.layout, node.segments, strict=True):
                for j, stacked in enumerate(block):
                    walk(stacked, [f"{n}.{start + r * period + j}" for n in names for r in range(reps)])
            return
        join = lambda n, part: f"{n}.{part}" if n else str(part)  # noqa: E731
        for field in dataclasses.fields(node):
            if field.metadata.get("static", False):
                continue
            child = getattr(node, field.name, None)
            if isinstance(child, (tuple, list)):
                for i, c in enumerate(child):
                    walk(c, [join(join(n, field.name), i) for n in names])
            else:
                walk(child, [join(n, field.name) for n in names])

    walk(model, [prefix])
    return out


class Location(NamedTuple):
    """Where the module at a path is: `steps` lead from the root to it ([`getter`][]);
    `reps > 0` when it is a block of a scanned segment of `reps` layers (its arrays have a
    leading axis of that size) and `row` the repetition the path names (-1 when unstacked);
    `mlp_steps` is the number of steps to the enclosing `mlp` when the module is inside one
    (such modules are called one token at a time), else None."""

    steps: tuple
    reps: int
    row: int
    mlp_steps: int | None


def locate(model, path: str) -> Location:
    """The [`Location`][] of the module at `path` (a key of [`module_paths`][]). The steps
    end at the node the path names, which may itself be a transparent wrapper."""
    parts = path.split(".")
    steps: list = []
    node, reps, row, mlp_steps = model, 0, -1, None
    for i, part in enumerate(parts):
        while _transparent(node) is not None:
            steps.append(_transparent(node))
            node = getattr(node, _transparent(node))
        if isinstance(node, LayerStack):
            layer = int(part)
            for k, (start, period, n) in enumerate(node.layout):
                if start <= layer < start + period * n:
                    r, j = divmod(layer - start, period)
                    steps.append(("segment", k, j))
                    node, reps, row = node.segments[k][j], n, r
                    break
        elif isinstance(node, (tuple, list)):
            steps.append(int(part))
            node = node[int(part)]
        else:
            steps.append(part)
            if part == "mlp" and i + 1 < len(parts):
                mlp_steps = len(steps)
            node = getattr(node, part)
    return Location(tuple(steps), reps, row, mlp_steps)


def getter(steps) -> Callable:
    """A function `model -> node` following `steps` (from a [`Location`][]), for `eqx.tree_at`."""

    def get(m, steps=tuple(steps)):
        for s in steps:
            if isinstance(s, tuple):  # ("segment", k, j): block j of a LayerStack's segment k
                m = m.segments[s[1]][s[2]]
            elif isinstance(s, int):
                m = m[s]
            else:
                m = getattr(m, s)
        return m

    return get


__all__ = ["Location", "getter", "locate", "module_paths"]
