"""The output channel of `eqxlm.inspect`: where captured activations go while a model runs.

A capture is recorded at trace time into the innermost open collector (a plain dict), so
it costs nothing when no collector is open and no module asks to record. A collector keeps the
trace it was opened in, and [`record`][] refuses a value from any other trace: a transformation
begun inside `run` (`run(jax.vmap(hooked), batch)`) would otherwise hand back its tracers. `jax.lax.scan`
(scanned layers) and `jax.vmap` (token-wise blocks) are trace boundaries that values may
not cross, so the code that opens such a boundary opens a nested collector inside it,
returns what it gathered as ordinary outputs of the transform, and re-records them outside
([`scan_scope`][] in `run_layers`). Nothing here runs unless `eqxlm.inspect` placed a hook.

A key is a tuple of `(name, row)`: `row` -1 for a value recorded as is, `r` for a value
recorded inside a scan whose row `r` (after stacking) belongs to `name`.
"""

import contextlib

import jax
from jax.extend.core import get_opaque_trace_state

from ._kinds import AbstractSequenceWise, AbstractTokenAxes

_STACK: list[tuple[dict, object]] = []  # (collector, the trace it was opened in)


def each_token(module, x):
    """Apply `module` (a norm, a token-wise MLP) to every vector along the last
    axis of `x` (one `jax.vmap` per leading axis), or call it once on all of `x` when it is an
    `eqxlm.nn.AbstractSequenceWise` (an `eqxlm.inspect` hook, which captures and patches the
    whole block, or a mixture of experts, which groups the tokens by expert) or an
    `eqxlm.nn.AbstractTokenAxes` (its `__call__` takes any leading token axes itself: the MLPs
    and LoRA adapters, as a few large products)."""
    if isinstance(module, (AbstractSequenceWise, AbstractTokenAxes)):
        return module(x)
    fn = module
    for _ in range(x.ndim - 1):
        fn = jax.vmap(fn)
    return fn(x)


def active() -> bool:
    """Whether a collector is open (`eqxlm.inspect.run` opens one)."""
    return bool(_STACK)


@contextlib.contextmanager
def collecting():
    """Open a collector: a dict `{key: value}` filled by [`record`][]."""
    got: dict = {}
    _STACK.append((got, get_opaque_trace_state()))
    try:
        yield got
    finally:
        _STACK.pop()


def record(key: tuple[tuple[str, int], ...], value) -> None:
    """Record `value` under `key` in the innermost collector."""
    if not _STACK:
        raise RuntimeError(
            "a capture hook ran outside `eqxlm.inspect.run(model, ...)`: run the hooked model through it "
            "to get the captured activations back."
        )
    got, trace = _STACK[-1]
    if get_opaque_trace_state() != trace:  # a value of an inner trace: it would leave it as a dead tracer
        raise RuntimeError(
            "a capture hook ran inside a transformation that began inside `eqxlm.inspect.run` (`jax.vmap`, "
            "`jax.jit`, `eqx.filter_jit`, `jax.checkpoint`, ...), so its value cannot leave it; put `run` "
            "inside the transformation instead: `jax.vmap(lambda ids: inspect.run(hooked, ids))(batch)`, "
            "`eqx.filter_jit(inspect.run)(hooked, ids)`."
        )
    got[key] = value


def tap(taps, point: str, x):
    """Declare the internal point `point` of a module's computation, with value `x`, to
    `eqxlm.inspect`; returns `x`, or the patched value when a hook patches `point`.

        class Scored(eqxlm.nn.AbstractTapped):
            tap_points: ClassVar[tuple[str, ...]] = ("scores",)
            ...
            def __call__(self, x, *, taps=None):
                scores = eqxlm.nn.tap(taps, "scores", self.score(x))
                ...

    **Arguments:** `taps`, the module's `taps` keyword argument (None unless an
    `eqxlm.inspect` hook asked for one of its points: then `x` is returned as is and the
    call traces as if the line were not there); `point`, one of the module's `tap_points`
    (see `eqxlm.nn.AbstractTapped`); `x`, the value.

    **Returns:** an array of `x`'s shape and dtype.
    """
    return x if taps is None else taps(point, x)


def wants(taps, point: str) -> bool:
    return taps is not None and point in getattr(taps, "points", ())


class scan_scope:
    """Carry captures out of a `jax.lax.scan` body: `inner()` inside the body (a context
    manager yielding the collector), `outputs()` as extra scan outputs, and `emit(stacked)`
    outside, which re-records row `r` of each stacked value under its name."""

    def __init__(self):
        self.enabled = active()
        self.keys: list = []

    @contextlib.contextmanager
    def inner(self):
        if not self.enabled:
            yield None
            return
        with collecting() as got:
            yield got
        self.keys = list(got)
        self._values = tuple(got[k] for k in self.keys)

    def outputs(self):
        return self._values if self.enabled else ()

    def emit(self, stacked) -> None:
        for key, value in zip(self.keys, stacked, strict=True):
            for name, row in key:
                record(((name, -1),), value if row < 0 else value[row])
