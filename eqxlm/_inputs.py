"""Array-likes at the public entry points: converted once, or refused with one clear message.

[`as_token_ids`][] and [`as_mask`][] accept jax arrays, numpy arrays and (nested) lists, and
return int32 / bool jax arrays. Token ids that are not integers (floats, bools, strings) or
of the wrong rank raise [`ArgumentError`][eqxlm._typing.ArgumentError] naming the argument,
what was expected, what was received, and how to fix the call. [`check_length`][] refuses
sequences longer than the model's `max_position_embeddings` and, for position schemes with
no limit (ALiBi), warns once when a sequence runs past the length the model was trained on.
"""

import warnings

import jax
import numpy as np

from ._typing import ArgumentError, describe

_DIMS = {1: "seq", 2: "batch seq"}


def _as_numpy_or_jax(x, name: str):
    if isinstance(x, (jax.Array, np.ndarray)):
        return x
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as e:
        raise ArgumentError(
            f"{name}: cannot make an array of {describe(x)} ({e}). Ragged rows must be padded to one length "
            f"(left padding, with an attention_mask); or build it with `jnp.asarray({name}, jnp.int32)`."
        ) from None


def _describe(array, original) -> str:
    if isinstance(original, (list, tuple)):
        return f"a {type(original).__name__} of shape [{','.join(map(str, array.shape))}] ({np.dtype(array.dtype).name})"
    return describe(array)


def _check_rank(array, name: str, ndim: int, original) -> None:
    if array.ndim == ndim:
        return
    expected = f"{ndim} dims ({_DIMS.get(ndim, '')})"
    hint = ""
    if array.ndim == ndim - 1 and ndim == 2:
        hint = f" For one sequence, pass a batch of one: `{name}[None]`."
    elif array.ndim == ndim + 1 and ndim == 1:
        hint = " This takes one sequence; for a batch, map it with `jax.vmap`."
    raise ArgumentError(f"{name}: expected {expected}, got {_describe(array, original)}.{hint}")


def as_token_ids(x, name: str = "input_ids", *, ndim: int = 2) -> jax.Array:
    """`x` (a jax or numpy array or nested lists of ints) as an int32 jax array of `ndim`
    dims (`2`: `batch seq`; `1`: `seq`). Refuses non-integer ids and a wrong rank."""
    array = _as_numpy_or_jax(x, name)
    if not np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        kind = "empty" if array.size == 0 and array.dtype == np.float64 else np.dtype(array.dtype).name
        raise ArgumentError(
            f"{name}: token ids must be integers, got {_describe(array, x) if kind != 'empty' else 'an empty list'}. "
            f"Convert them with `jnp.asarray({name}, jnp.int32)` (ids of a tokenizer are ints already)."
        )
    _check_rank(array, name, ndim, x)
    if (
        isinstance(array, np.ndarray)
        and array.size
        and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max)
    ):
        raise ArgumentError(f"{name}: token ids must fit in int32, got values up to {array.max()}.")
    return _to_jax(array, np.int32)


def as_mask(x, shape: tuple[int, ...], name: str = "attention_mask") -> jax.Array:
    """An attention mask (ints 0/1 or bools, array-like) as a bool jax array of `shape`."""
    array = _as_numpy_or_jax(x, name)
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ArgumentError(
            f"{name}: expected ints (1 = real token, 0 = padding) or bools, got {describe(array)}. "
            f"Convert with `jnp.asarray({name}, bool)`."
        )
    if tuple(array.shape) != tuple(shape):
        raise ArgumentError(f"{name}: expected the shape of input_ids {list(shape)}, got {describe(array)}.")
    if isinstance(array, np.ndarray) and array.size and not np.isin(array, (0, 1)).all():
        raise ArgumentError(f"{name}: expected only 0 and 1, got values {sorted(set(np.unique(array).tolist()))[:6]}.")
    return _to_jax(array, np.bool_)


def _to_jax(array, dtype) -> jax.Array:
    """A jax array of `dtype`; numpy inputs are converted on the host and placed with
    `device_put`, so no conversion is compiled for each new shape."""
    if isinstance(array, np.ndarray):
        return jax.device_put(array.astype(dtype, copy=False))
    return array if array.dtype == dtype else array.astype(dtype)


_WARNED: set = set()


def trained_length(config) -> int | None:
    """The sequence length a model was trained on, when its config says: for models with
    no position limit (BLOOM: ALiBi), the `seq_length` / `n_positions` that checkpoints
    carry as an ignored field."""
    import json

    for name, text in getattr(config, "extra", ()):
        if name in ("seq_length", "n_positions", "max_sequence_length"):
            value = json.loads(text)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_length(config, length: int, what: str) -> None:
    """Refuse `length` positions beyond `max_position_embeddings`; for a model with no
    position limit, warn once (per model type and length limit) past its trained length."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None:
        if length > limit:
            raise ValueError(f"{what} = {length} positions exceeds the model's max_position_embeddings ({limit}).")
        return
    trained = trained_length(config)
    if trained is not None and length > trained and (config.model_type, trained) not in _WARNED:
        _WARNED.add((config.model_type, trained))
        warnings.warn(
            f"{what} = {length} positions runs past the {trained} the model was trained on ({config.model_type} has no "
            "position limit, but quality usually degrades beyond the trained length). Warned once.",
            UserWarning,
            stacklevel=3,
        )
