"""Running a model's layers: unrolled (a tuple) or scanned (stacked, `jax.lax.scan`).

Scanning needs identical layers, but families mix layer types (Gemma 2 alternates sliding
and global attention, Qwen2 switches to sliding windows at `max_window_layers`). So layers
are grouped by their **repeating pattern**: a segment is a block of `period` consecutive
layers repeated `reps` times, stored with every leaf stacked over the repetitions, and run
as one `lax.scan` whose body runs the block. A uniform model is one segment of period 1;
Gemma 2 is one segment of period 2; a layer that repeats nothing is a segment of one.

Per-layer caches are stacked the same way and scanned in and out with their layers.
Checkpoint names are unaffected: `eqxlm.params` names the layer `start + r * period + j`
as `layers.{that}` in both layouts.
"""

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from . import _taps


def _signature(layer) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(layer)
    return treedef, tuple((tuple(x.shape), x.dtype) if hasattr(x, "shape") else x for x in leaves)


def plan_segments(signatures: Sequence[Any]) -> tuple[tuple[int, int, int], ...]:
    """Greedy grouping into `(start, period, reps)`: at each layer, the block that repeats
    over the most layers (ties: the shortest period); a layer that starts no repetition is
    a segment of its own."""
    n, i, layout = len(signatures), 0, []
    while i < n:
        best_period, best_reps = 1, 1
        for period in range(1, (n - i) // 2 + 1):
            reps = 1
            while i + (reps + 1) * period <= n and all(
                signatures[i + reps * period + j] == signatures[i + j] for j in range(period)
            ):
                reps += 1
            if reps >= 2 and reps * period > best_period * best_reps:
                best_period, best_reps = period, reps
        layout.append((i, best_period, best_reps))
        i += best_period * best_reps
    return tuple(layout)


def _stack(modules):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *modules)


def _unstack(module, reps: int):
    return [jax.tree.map(lambda x: x[r], module) for r in range(reps)]


def regroup(items: Sequence[Any], layout) -> tuple[tuple[Any, ...], ...]:
    """Per-layer pytrees (layers, or their caches) stacked into `layout`'s segments."""
    return tuple(
        tuple(_stack([items[start + r * period + j] for r in range(reps)]) for j in range(period))
        for start, period, reps in layout
    )


class LayerStack(eqx.Module):
    """The decoder layers, stacked per repeating segment and run with `jax.lax.scan`.

    `segments[k][j]` is block position `j` of segment `k`: a layer whose array leaves have
    a leading axis of `reps`. `layout[k] = (start, period, reps)`.
    """

    segments: tuple[tuple[Any, ...], ...]
    layout: tuple[tuple[int, int, int], ...] = eqx.field(static=True)

    @classmethod
    def from_layers(cls, layers: Sequence[Any]) -> "LayerStack":
        """Stack existing layers (e.g. `eqxlm.scan_layers(model)`)."""
        layout = plan_segments([_signature(layer) for layer in layers])
        return cls(segments=regroup(layers, layout), layout=layout)

    @classmethod
    def build(cls, make_layer: Callable, keys) -> "LayerStack":
        """Build stacked layers directly, `make_layer(i, key)` under `eqx.filter_vmap` for
        every block position, so no unstacked copy is ever made. Layer `i` gets `keys[i]`,
        exactly as when built unrolled."""
        n = len(keys)
        shapes = [eqx.filter_eval_shape(make_layer, i, keys[i]) for i in range(n)]
        layout = plan_segments([_signature(s) for s in shapes])
        segments = []
        for start, period, reps in layout:
            block = []
            for j in range(period):
                index = [start + r * period + j for r in range(reps)]
                block.append(eqx.filter_vmap(lambda k, i=start + j: make_layer(i, k))(jnp.stack([keys[i] for i in index])))
            segments.append(tuple(block))
        return cls(segments=tuple(segments), layout=layout)

    @property
    def num_layers(self) -> int:
        return sum(period * reps for _, period, reps in self.layout)

    def unstack(self) -> tuple[Any, ...]:
        """The layers as a tuple, in order (e.g. `eqxlm.unscan_layers(model)`)."""
        layers: list[Any] = [None] * self.num_layers
        for (start, period, reps), block in zip(self.layout, self.segments, strict=True):
            for j, stacked in enumerate(block):
                for r, layer in enumerate(_unstack(stacked, reps)):
                    layers[start + r * period + j] = layer
        return tuple(layers)

    def layer(self, i: int):
        """Layer `i` (a view; sliced from its segment)."""
        for (start, period, reps), block in zip(self.layout, self.segments, strict=True):
            if start <= i < start + period * reps:
                r, j = divmod(i - start, period)
                return jax.tree.map(lambda x: x[r], block[j])
        raise IndexError(i)


def run_layers(layers, x, call: Callable, caches, *, collect: bool):
    """Run `layers` (a tuple, or a [`LayerStack`][]) over `x`.

    `call(layer, x, cache) -> (x, weights, cache)` runs one layer; `caches` has the
    layers' layout (or is None). **Returns:** `x`, the per-layer outputs and weights in
    layer order (when `collect`), and the new caches in the layers' layout.
    """
    if not isinstance(layers, LayerStack):
        outs, weights, new_caches = [], [], []
        for i, layer in enumerate(layers):
            x, w, c = call(layer, x, None if caches is None else caches[i])
            outs.append(x)
            weights.append(w)
            new_caches.append(c)
        return x, outs, weights, None if caches is None else tuple(new_caches)
    n = layers.num_layers
    outs, weights = [None] * n, [None] * n
    new_segments = []
    for k, ((start, period, reps), block) in enumerate(zip(layers.layout, layers.segments, strict=True)):
        params, static = eqx.partition(block, eqx.is_array)
        seg_cache = None if caches is None else caches[k]
        scope = _taps.scan_scope()  # captures of `eqxlm.inspect` hooks leave the scan as outputs

        def body(x, xs, static=static, period=period, scope=scope):
            block = eqx.combine(xs[0], static)
            cache = xs[1]
            ys_out, ys_w, ys_c = [], [], []
            with scope.inner():
                for j in range(period):
                    x, w, c = call(block[j], x, None if cache is None else cache[j])
                    ys_out.append(x if collect else None)
                    ys_w.append(w if collect else None)
                    ys_c.append(c)
            return x, (tuple(ys_out), tuple(ys_w), None if cache is None else tuple(ys_c), scope.outputs())

        x, (ys_out, ys_w, ys_c, captured) = jax.lax.scan(body, x, (params, seg_cache))
        scope.emit(captured)
        new_segments.append(ys_c)
        if collect:
            for r in range(reps):
                for j in range(period):
                    i = start + r * period + j
                    outs[i] = ys_out[j][r]
                    weights[i] = None if ys_w[j] is None else ys_w[j][r]
    return x, outs, weights, None if caches is None else tuple(new_segments)
