"""Refuse, at once, to build or load a model whose weights cannot fit in memory.

Without this check a 7B-shaped random initialisation on a small machine runs until the
kernel kills it, minutes later, with no word. [`check_fits_in_memory`][] compares the
weights' bytes (from an abstract model, `eqx.filter_eval_shape`, which allocates nothing)
with the memory available: the default device's free memory (`memory_stats()`), or on CPU
`MemAvailable` from `/proc/meminfo`. Where neither can be read, nothing is refused.
"""

import math
from pathlib import Path

import equinox as eqx
import jax
import numpy as np


class InsufficientMemoryError(MemoryError):
    """The weights of the model asked for cannot fit in the memory available."""


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def weight_bytes(model) -> int:
    """Bytes of every array leaf of `model` (concrete arrays or `ShapeDtypeStruct`s)."""
    is_leaf = lambda x: isinstance(x, jax.ShapeDtypeStruct)  # noqa: E731
    leaves = [x for x in jax.tree.leaves(model, is_leaf=is_leaf) if is_leaf(x) or eqx.is_array(x)]
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)


def available_memory(device=None) -> tuple[int, str] | None:
    """(bytes free, where that figure comes from) for `device` (default: the first device),
    or None when it cannot be known."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        try:
            stats = device.memory_stats() or {}
        except Exception:  # some backends do not implement memory_stats
            stats = {}
        if "bytes_limit" in stats:
            return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"free on {device.device_kind}"
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    return None


def check_fits_in_memory(abstract_model_or_bytes, what: str, *, devices: int = 1) -> None:
    """Raise [`InsufficientMemoryError`][] when the weights cannot fit.

    **Arguments:**
    - `abstract_model_or_bytes`: a model (abstract from `eqx.filter_eval_shape`, or not) or
      a number of bytes.
    - `what`: how the message names the model (`"DecoderLM(MistralConfig(...))"`).
    - `devices`: the weights are spread over this many accelerator devices (a mesh); on CPU
      all devices share the host's memory, so the whole size is compared.
    """
    needed = abstract_model_or_bytes if isinstance(abstract_model_or_bytes, int) else weight_bytes(abstract_model_or_bytes)
    free = available_memory()
    if free is None:
        return
    available, source = free
    share = needed if jax.devices()[0].platform == "cpu" else needed / max(1, devices)
    if share > available:
        raise InsufficientMemoryError(
            f"{what}: its weights need {_gib(share)}{' per device' if share != needed else ''}, but only "
            f"{_gib(available)} is available ({source}). Use a smaller config, a 16-bit dtype, or a mesh of "
            "devices with more memory."
        )


def check_constructor(cls, config, *, key, dtype=None, **kwargs) -> None:
    """For a model constructor, before it allocates: the weights of `cls(config, key=key,
    dtype=dtype)` must fit. Inside an abstract evaluation (`key` is a tracer, as in
    `from_pretrained`'s skeleton or this very check) it does nothing."""
    if isinstance(key, jax.core.Tracer):
        return
    kwargs = dict(kwargs, **({} if dtype is None else {"dtype": dtype}))
    abstract = eqx.filter_eval_shape(lambda k: cls(config, key=k, **kwargs), key)
    check_fits_in_memory(abstract, f"{cls.__name__}({type(config).__name__}(...))")
