"""The one place where eqxlm's runtime shape checks are switched on or off, and made short.

Every public function and every `__call__` of eqxlm is decorated with [`typecheck`][],
which is `jaxtyping.jaxtyped(typechecker=beartype.beartype)` plus a rewrite of its errors.
The checks run when the Python function runs: eagerly on every call, and under `jax.jit` /
`eqx.filter_jit` only while tracing, so a compiled function pays nothing per call.

A failed check raises [`ArgumentError`][] (a `jaxtyping.TypeCheckError`, so a `TypeError`)
of a few lines: the function, the parameter, the expected annotation, a summary of what was
received (shape and dtype; never the repr of a large pytree such as a model), the dims bound
so far, and, where the shape says what went wrong, how to fix the call (`input_ids[None]` for
one sequence where a batch is expected, `jax.vmap` for a batch where one example is). The
full jaxtyping report stays available as the error's `.report`.

The switch: set the environment variable `EQXLM_TYPECHECK=0` before importing eqxlm
and the decorator returns the function untouched (no checks, no wrapper). Checks are
on by default.
"""

import functools
import inspect
import os
import re
import types
import typing
from collections.abc import Callable
from typing import TypeVar

import beartype
import jax
import jaxtyping
import numpy as np

_F = TypeVar("_F", bound=Callable)

TYPECHECK: bool = os.environ.get("EQXLM_TYPECHECK", "1").strip().lower() not in (
    "0",
    "false",
    "no",
    "off",
)


class ArgumentError(jaxtyping.TypeCheckError):
    """A call whose argument does not match the annotation: a short message naming the
    parameter, what was expected and what was received. `.report` holds jaxtyping's own."""

    report: str = ""


def _annotation(tp) -> str:
    """`Int[Array, 'batch seq'] | Int[np.ndarray, 'batch seq'] | None`, without module paths."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_annotation(t) for t in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if hasattr(tp, "dim_str") and hasattr(tp, "array_type"):
        name = tp.__name__.split("[", 1)[0]
        array = {np.ndarray: "np.ndarray", jax.Array: "Array"}.get(tp.array_type, getattr(tp.array_type, "__name__", "?"))
        return f"{name}[{array}, '{tp.dim_str}']"
    if isinstance(tp, type):
        return tp.__name__
    return re.sub(r"\b(?:[a-z_][\w]*\.)+([A-Za-z_]\w*)", r"\1", str(tp))


def describe(value) -> str:
    """A short summary of a value: `int32[4]`, `numpy float64[2,3]`, `list of 3`, or the
    type's name for anything else large (a model is never printed)."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        text = f"{np.dtype(dtype).name}[{','.join(map(str, shape))}]"
        return f"numpy {text}" if isinstance(value, np.ndarray) else text
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    if value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value)
        return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
    return type(value).__name__


def _arrays(tp) -> list:
    """The array annotations in `tp` (a union or one type)."""
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return [t for t in members if hasattr(t, "dims") and hasattr(t, "array_type")]


def _hint(name: str, tp, value) -> str | None:
    arrays = _arrays(tp)
    ndims = [len(t.dims) for t in arrays]
    if not ndims:
        return None
    if isinstance(value, (list, tuple)):
        return f"Convert it first: `jnp.asarray({name}, jnp.int32)` for token ids."
    ndim = getattr(value, "ndim", None)
    if ndim is None:
        return None
    text = _annotation(tp)
    if ndim + 1 in ndims and "batch" in text:
        return f"For one sequence, pass a batch of one: `{name}[None]`."
    if ndim - 1 in ndims and "batch" not in text:
        return "This takes one example; for a batch, map it with `jax.vmap`."
    dtype = getattr(value, "dtype", None)
    allowed = {d for t in arrays if len(t.dims) == ndim for d in t.dtypes}
    if ndim in ndims and dtype is not None and np.dtype(dtype).name not in allowed:
        kinds = sorted({t.__name__.split("[", 1)[0] for t in arrays if len(t.dims) == ndim})
        fix = f" Token ids are integers: `jnp.asarray({name}, jnp.int32)`." if "ids" in name else ""
        return f"The dtype is wrong: expected {' or '.join(kinds)}, got {np.dtype(dtype).name}.{fix}"
    if ndim in ndims:
        return "The rank and dtype are right: a dim disagrees with the dims bound above."
    return None


def _short(fn, signature: inspect.Signature, args, kwargs, error: jaxtyping.TypeCheckError) -> str:
    report = str(error)
    where = f"{fn.__module__}.{fn.__qualname__}"
    dims = []
    if "The current values for each jaxtyping axis annotation are as follows." in report:
        tail = report.split("The current values for each jaxtyping axis annotation are as follows.", 1)[1]
        dims = [line.strip() for line in tail.splitlines() if re.fullmatch(r"\s*[\w*.]+=.*", line)]
    bound = f"Dims bound: {', '.join(dims)}." if dims else None
    match = re.search(r"typechecking parameter '(\w+)'", report)
    if match is None:
        return_match = "return value" in report.splitlines()[0] if report else False
        first = f"{where}: {'its return value' if return_match else 'a value'} does not match its annotation"
        expected = signature.return_annotation if return_match else None
        line = first + (f" {_annotation(expected)}." if expected not in (None, inspect.Signature.empty) else ".")
        return "\n".join(x for x in (line, bound) if x)
    name = match.group(1)
    try:
        value = signature.bind(*args, **kwargs).arguments.get(name)
    except TypeError:
        value = None
    parameter = signature.parameters.get(name)
    tp = parameter.annotation if parameter is not None else None
    line = f"{where}: parameter '{name}' expected {_annotation(tp)}, got {describe(value)}."
    return "\n".join(x for x in (line, bound, _hint(name, tp, value)) if x)


def typecheck(fn: _F) -> _F:
    """Check `fn`'s jaxtyping annotations with beartype (unless `EQXLM_TYPECHECK=0`), and
    turn a failure into a short [`ArgumentError`][]."""
    if not TYPECHECK:
        return fn
    checked = jaxtyping.jaxtyped(fn, typechecker=beartype.beartype)
    signature = inspect.signature(fn, eval_str=False)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return checked(*args, **kwargs)
        except ArgumentError:
            raise
        except jaxtyping.TypeCheckError as e:
            if fn.__qualname__ not in str(e).split("\n", 1)[0]:
                raise  # raised by something this function called, not by its own check
            error = ArgumentError(_short(fn, signature, args, kwargs, e))
            error.report = str(e)
            raise error from None

    return wrapper  # type: ignore[return-value]
