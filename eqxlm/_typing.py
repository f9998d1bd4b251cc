"""The one place where eqxlm's runtime shape checks are switched on or off.

Every public function and every `__call__` of eqxlm is decorated with [`typecheck`][],
which is `jaxtyping.jaxtyped(typechecker=beartype.beartype)`. The checks run when the
Python function runs: eagerly on every call, and under `jax.jit` / `eqx.filter_jit`
only while tracing, so a compiled function pays nothing per call.

The switch: set the environment variable `EQXLM_TYPECHECK=0` before importing eqxlm
and the decorator returns the function untouched (no checks, no wrapper). Checks are
on by default.
"""

import os
from collections.abc import Callable
from typing import TypeVar

import beartype
import jaxtyping

_F = TypeVar("_F", bound=Callable)

TYPECHECK: bool = os.environ.get("EQXLM_TYPECHECK", "1").strip().lower() not in (
    "0",
    "false",
    "no",
    "off",
)


def typecheck(fn: _F) -> _F:
    """Check `fn`'s jaxtyping annotations with beartype (unless `EQXLM_TYPECHECK=0`)."""
    if not TYPECHECK:
        return fn
    return jaxtyping.jaxtyped(fn, typechecker=beartype.beartype)
