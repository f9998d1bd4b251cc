"""Rotary position embedding (RoPE) in Hugging Face's rotate-half layout."""

import dataclasses
import math
from typing import Any, ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from .._typing import typecheck
from ._positions import AbstractPositionScheme

#: `rope_type` -> its scaling class (`register_rope_type` adds one).
ROPE_TYPES: dict[str, type["RopeScaling"]] = {}
#: Scaling types transformers knows that eqxlm refuses, with why.
REFUSED_ROPE_TYPES = {
    "dynamic": "transformers recomputes its frequencies from the longest sequence seen so far, so a "
    "cached key's rotation depends on the calls before it",
}


def register_rope_type(cls: type["RopeScaling"]) -> type["RopeScaling"]:
    """Register a [`RopeScaling`][] subclass under its `rope_type` (a class decorator)."""
    ROPE_TYPES[cls.rope_type] = cls
    return cls


def _exponents(dim: int) -> np.ndarray:
    """$2i/dim$, $i < dim/2$, in float32 (transformers' `torch.arange(0, dim, 2).float() / dim`)."""
    return np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)


def _base_frequencies(dim: int, theta: float) -> np.ndarray:
    r"""$\theta^{-2i/dim}$ in float32, as `_compute_default_rope_parameters`."""
    return (np.float32(1.0) / (np.float32(theta) ** _exponents(dim))).astype(np.float32)


@register_rope_type
@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A rotary scaling type: one frozen class per `rope_type` of transformers'
    `rope_parameters` (transformers 4: `rope_scaling`), holding that type's fields only. This
    base class is `default` (no scaling); `ROPE_TYPES` maps each supported `rope_type` to its
    class, and a type outside it is refused by name.

    A new type is a subclass with its fields, `rope_type`, and its own
    `inverse_frequencies` (and `attention_scaling` where cos and sin are scaled), registered
    with `register_rope_type`.
    """

    rope_type: ClassVar[str] = "default"

    @classmethod
    def from_hf(cls, params: dict[str, Any]) -> "RopeScaling":
        """This type's fields from a `rope_parameters` dict without `rope_type` and
        `rope_theta`. A field the type lacks, or a required one missing, raises naming it."""
        fields = dataclasses.fields(cls)
        unknown = sorted(set(params) - {f.name for f in fields})
        if unknown:
            raise ValueError(f"rope_scaling: unsupported field(s) {', '.join(unknown)} for rope_type {cls.rope_type!r}.")
        missing = [f.name for f in fields if f.name not in params and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"rope_scaling: rope_type {cls.rope_type!r} needs {', '.join(missing)}.")
        return cls(**params)

    def to_hf(self) -> dict[str, Any]:
        """The `rope_parameters` entries of this type (None fields left out), `rope_type` first."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"rope_type": self.rope_type} | {
            k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if v is not None
        }

    def resolve(self, max_position_embeddings: int | None) -> "RopeScaling":
        """This scaling with any value a config derives from `max_position_embeddings`
        filled in (longrope's and yarn's missing `factor`)."""
        return self

    def inverse_frequencies(self, dim: int, theta: float, *, long: bool = False) -> np.ndarray:
        r"""The float32 inverse frequencies of a rotary dim `dim` (`dim / 2` of them) for base
        `theta`, computed as `transformers.modeling_rope_utils` does; `long` selects longrope's
        long factors."""
        return _base_frequencies(dim, theta)

    def attention_scaling(self) -> float:
        """The factor transformers multiplies cos and sin by (`attention_scaling`): 1 here."""
        return 1.0

    def frequencies_at(self, dim: int, theta: float, positions: Int[Array, " seq"]) -> Float[Array, " half"]:
        """The inverse frequencies a forward call over `positions` uses (a constant, except
        for longrope)."""
        return jnp.asarray(self.inverse_frequencies(dim, theta))

    def check(self, dim: int, theta: float) -> None:
        """Compute everything once, so that a bad value is refused at construction."""
        self.inverse_frequencies(dim, theta)
        self.attention_scaling()


@register_rope_type
@dataclasses.dataclass(frozen=True)
class LinearScaling(RopeScaling):
    """`linear`: the inverse frequencies divided by `factor` (positions interpolated)."""

    rope_type: ClassVar[str] = "linear"
    factor: float

    def inverse_frequencies(self, dim, theta, *, long=False):
        return (_base_frequencies(dim, theta) / np.float32(self.factor)).astype(np.float32)


@register_rope_type
@dataclasses.dataclass(frozen=True)
class Llama3Scaling(RopeScaling):
    """`llama3`: long wavelengths divided by `factor`, short ones kept, and those between
    interpolated (`_compute_llama3_parameters`)."""

    rope_type: ClassVar[str] = "llama3"
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def inverse_frequencies(self, dim, theta, *, long=False):
        inv_freq = _base_frequencies(dim, theta)
        factor = np.float32(self.factor)
        old_len = self.original_max_position_embeddings
        low_wavelen = old_len / self.low_freq_factor
        high_wavelen = old_len / self.high_freq_factor
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
        smooth = (np.float32(old_len) / wavelen - np.float32(self.low_freq_factor)) / np.float32(
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)


class _ContextExtension(RopeScaling):
    """What `yarn` and `longrope` share: a `factor` of None is `max_position_embeddings /
    original_max_position_embeddings` (`resolve`), and cos and sin are scaled by
    `attention_factor`, else by a value the type derives from `factor`."""

    def resolve(self, max_position_embeddings):
        if self.factor is None and max_position_embeddings is not None:
            return dataclasses.replace(self, factor=max_position_embeddings / self.original_max_position_embeddings)
        return self

    def scale_factor(self) -> float:
        """`factor`, refused by name when it is missing."""
        if self.factor is None:
            raise ValueError(
                f"rope_scaling: rope_type {self.rope_type!r} needs `factor` (or a config's "
                "max_position_embeddings to derive it from)."
            )
        return self.factor

    def attention_scaling(self) -> float:
        if self.attention_factor is not None:
            return float(self.attention_factor)
        return self.attention_from_factor(self.scale_factor())

    def attention_from_factor(self, factor: float) -> float:
        raise NotImplementedError


@register_rope_type
@dataclasses.dataclass(frozen=True)
class YarnScaling(_ContextExtension):
    """`yarn` (`_compute_yarn_parameters`): frequencies between extrapolation (short
    wavelengths) and interpolation by `factor` (long ones), ramped linearly over the dims
    whose rotations within `original_max_position_embeddings` lie between `beta_slow` and
    `beta_fast` (bounds floored and ceiled unless `truncate` is false); cos and sin scaled by
    `attention_factor`, else `0.1 * mscale * ln(factor) + 1` over the same with
    `mscale_all_dim` (both given), else `0.1 ln(factor) + 1`. A `factor` of None is
    `max_position_embeddings / original_max_position_embeddings`."""

    rope_type: ClassVar[str] = "yarn"
    original_max_position_embeddings: int
    factor: float | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None

    def attention_from_factor(self, factor: float) -> float:
        def mscale(scale: float) -> float:
            return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0

        if self.mscale and self.mscale_all_dim:
            return float(mscale(self.mscale) / mscale(self.mscale_all_dim))
        return mscale(1.0)

    def inverse_frequencies(self, dim, theta, *, long=False):
        factor = self.scale_factor()
        beta_fast, beta_slow = self.beta_fast or 32, self.beta_slow or 1
        original = self.original_max_position_embeddings

        def correction_dim(rotations: float) -> float:  # the dim that turns `rotations` times over `original`
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if self.truncate is None or self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        extrapolation = (1 - ramp).astype(np.float32)
        pos_freqs = np.float32(theta) ** _exponents(dim)
        interpolated = np.float32(1.0) / (np.float32(factor) * pos_freqs)
        extrapolated = np.float32(1.0) / pos_freqs
        return (interpolated * (1 - extrapolation) + extrapolated * extrapolation).astype(np.float32)


@register_rope_type
@dataclasses.dataclass(frozen=True)
class LongRopeScaling(_ContextExtension):
    """`longrope` (`_compute_longrope_parameters`): the inverse frequencies divided by
    `short_factor`, or by `long_factor` (one per rotated frequency) for a forward call whose
    largest position + 1 exceeds `original_max_position_embeddings`; cos and sin scaled by
    `attention_factor`, else `sqrt(1 + ln(factor) / ln(original_max_position_embeddings))`
    (1 when `factor <= 1`). A `factor` of None is `max_position_embeddings /
    original_max_position_embeddings`."""

    rope_type: ClassVar[str] = "longrope"
    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    factor: float | None = None
    attention_factor: float | None = None

    def __post_init__(self):
        for name in ("short_factor", "long_factor"):  # hashable (a static field), as float32 will read them
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(float(v) for v in value))

    def attention_from_factor(self, factor: float) -> float:
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(self.original_max_position_embeddings))

    def inverse_frequencies(self, dim, theta, *, long=False):  # 1 / (ext * base ** exponent)
        exponent = _exponents(dim)
        ext = np.asarray(self.long_factor if long else self.short_factor, np.float32)
        if ext.shape != exponent.shape:
            raise ValueError(
                f"rope_scaling: longrope {'long' if long else 'short'}_factor has {ext.size} entries, "
                f"expected {exponent.size} (rotary dim {dim} / 2)."
            )
        return (np.float32(1.0) / (ext * (np.float32(theta) ** exponent))).astype(np.float32)

    def frequencies_at(self, dim, theta, positions):
        short = jnp.asarray(self.inverse_frequencies(dim, theta))
        long = jnp.asarray(self.inverse_frequencies(dim, theta, long=True))
        return jnp.where(longrope_uses_long(self, positions), long, short)

    def check(self, dim, theta):
        super().check(dim, theta)
        self.inverse_frequencies(dim, theta, long=True)


def rope_scaling_from_hf(params: dict[str, Any], *, max_position_embeddings: int | None = None) -> RopeScaling:
    """The [`RopeScaling`][] of a `rope_parameters` / `rope_scaling` dict (its `rope_type`, or
    transformers 4's `type`, picks the class in `ROPE_TYPES`; `rope_theta` is not a scaling
    field and must not be in it). A type with an `original_max_position_embeddings` field takes
    `max_position_embeddings` when the dict lacks one, as transformers' `standardize_rope_params`
    does. An unsupported type or field raises naming it."""
    params = dict(params)
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if not isinstance(rope_type, str):
        raise ValueError(f"rope_scaling.rope_type: expected str, got {type(rope_type).__name__} {rope_type!r:.40}.")
    if rope_type not in ROPE_TYPES:
        why = f": {REFUSED_ROPE_TYPES[rope_type]}" if rope_type in REFUSED_ROPE_TYPES else ""
        raise ValueError(
            f"rope_scaling: rope_type {rope_type!r} is not supported by eqxlm{why} "
            f"(supported: {', '.join(sorted(ROPE_TYPES))})."
        )
    kind = ROPE_TYPES[rope_type]
    if max_position_embeddings is not None and "original_max_position_embeddings" in {f.name for f in dataclasses.fields(kind)}:
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    return kind.from_hf(params)


def longrope_uses_long(scaling: LongRopeScaling, positions: Int[Array, " seq"]) -> Bool[Array, ""]:
    """Whether a forward call over `positions` uses `long_factor`: `max(positions) + 1 >
    original_max_position_embeddings`, one choice for the whole call, as transformers'
    `longrope_frequency_update` decides it."""
    return jnp.max(positions) + 1 > scaling.original_max_position_embeddings


def rope_inverse_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None = None, *, long: bool = False
) -> np.ndarray:
    r"""The inverse frequencies $\theta^{-2i/d}$, $i < d/2$, as a float32 numpy array, under
    `scaling` (None: default), as `transformers.modeling_rope_utils` computes them."""
    return (scaling or RopeScaling()).inverse_frequencies(head_dim, theta, long=long)


class RotaryEmbedding(AbstractPositionScheme):
    r"""Rotary position embedding from explicit per-token positions.

    For the rotated part of a head vector at position $p$, with angles $\phi = p \cdot f$ for
    the inverse frequencies $f$:

    - rotate-half layout (Llama and most families): $x = [x_1; x_2]$ (two halves),
      $\mathrm{rope}(x) = x \cos\phi + [-x_2; x_1] \sin\phi$ with $f$ duplicated over the halves;
    - interleaved layout (`interleaved=True`: Cohere, GPT-J): pairs $(x_{2i}, x_{2i+1})$ are rotated
      by $\phi_i$.

    Partial rotary (`rotary_dim < head_dim`: GPT-NeoX `rotary_pct`, Phi `partial_rotary_factor`)
    rotates the first `rotary_dim` dims and passes the rest through, as
    `apply_rotary_pos_emb` does there.

    Angles are computed in float32 from the integer positions and only then cast to the
    input dtype, as `LlamaRotaryEmbedding` does. Because positions are explicit, a
    left-padded row or a cached decode step needs nothing special. Nothing is stored but
    static numbers; the frequency table is a compile-time constant.

    **Arguments (constructor):** `head_dim`; `theta` (HF `rope_theta`); `scaling` (a
    [`RopeScaling`][], None for `default`); `rotary_dim` (default `head_dim`); `interleaved`.
    """

    head_dim: int = eqx.field(static=True)
    theta: float = eqx.field(static=True)
    scaling: RopeScaling | None = eqx.field(static=True, default=None)
    rotary_dim: int | None = eqx.field(static=True, default=None)
    interleaved: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if not 0 < self.dim <= self.head_dim:
            raise ValueError(f"RotaryEmbedding: rotary_dim must be in (0, head_dim={self.head_dim}], got {self.rotary_dim}.")
        if self.scaling is not None:  # factor lengths, a missing factor: refused here, by name
            self.scaling.check(self.frequency_dim, self.theta)

    @property
    def frequency_dim(self) -> int:
        """The `dim` of the frequency formula $\\theta^{-2i/dim}$ (the rotary dim as configured)."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def dim(self) -> int:
        """The number of rotated dims of each head: two per frequency. For an odd configured
        rotary dim (GPT-NeoX's `int(head_dim * rotary_pct)` can be odd) that is one more, as in
        transformers, whose cos/sin tables are twice the number of frequencies wide."""
        return 2 * len(range(0, self.frequency_dim, 2))

    @typecheck
    def cos_sin(self, positions: Int[Array, " seq"]) -> tuple[Float[Array, "seq rot"], Float[Array, "seq rot"]]:
        """The float32 cosine and sine tables for `positions` (each `seq x rotary_dim`)."""
        scaling = self.scaling or RopeScaling()
        inv_freq = scaling.frequencies_at(self.frequency_dim, self.theta, positions)
        freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
        if self.interleaved:
            angles = jnp.repeat(freqs, 2, axis=-1)
        else:
            angles = jnp.concatenate([freqs, freqs], axis=-1)
        scale = scaling.attention_scaling()
        return jnp.cos(angles) * scale, jnp.sin(angles) * scale

    @typecheck
    def __call__(
        self, x: Float[Array, "seq heads head_dim"], positions: Int[Array, " seq"]
    ) -> Float[Array, "seq heads head_dim"]:
        """**Arguments:** `x` (queries or keys), `positions` of each token.
        **Returns:** `x` rotated, in `x`'s dtype."""
        cos, sin = self.cos_sin(positions)
        cos = cos.astype(x.dtype)[:, None, :]
        sin = sin.astype(x.dtype)[:, None, :]
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        if self.interleaved:
            pairs = rot.reshape(*rot.shape[:-1], -1, 2)
            rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(rot.shape)
        else:
            half = self.dim // 2
            rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
        out = rot * cos + rotated * sin
        return out if self.dim == self.head_dim else jnp.concatenate([out, rest], axis=-1)

    def rotate(self, x, positions):
        return self(x, positions)

    def bias(self, key_positions):
        return None
