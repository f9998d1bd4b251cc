"""Rotary position embedding (RoPE) in Hugging Face's rotate-half layout."""

import dataclasses
import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from .._typing import typecheck
from ._positions import AbstractPositionScheme

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A `rope_scaling` (transformers 4) / `rope_parameters` (transformers 5) entry.

    Only the types whose frequencies eqxlm reproduces exactly are accepted
    (`SUPPORTED_ROPE_TYPES`); any other `rope_type` raises, naming it.

    **Fields:** `rope_type` (`"linear"`, `"llama3"` or `"longrope"`); `factor`; for `llama3`
    also `low_freq_factor`, `high_freq_factor` and `original_max_position_embeddings`; for
    `longrope` `short_factor`, `long_factor` (one per rotated frequency),
    `original_max_position_embeddings`, and `attention_factor` or `factor` (a `factor` of None
    is derived by the family as `max_position_embeddings / original_max_position_embeddings`,
    as `_compute_longrope_parameters` does).
    """

    rope_type: str
    factor: float | None = 1.0
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float | None = None

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling: rope_type {self.rope_type!r} is not supported by eqxlm "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})."
            )
        if self.rope_type == "llama3":
            missing = [
                f for f in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if getattr(self, f) is None
            ]
            if missing:
                raise ValueError(f"rope_scaling: rope_type 'llama3' needs {', '.join(missing)}.")
        if self.rope_type == "longrope":
            missing = [f for f in ("short_factor", "long_factor", "original_max_position_embeddings") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"rope_scaling: rope_type 'longrope' needs {', '.join(missing)}.")
            for name in ("short_factor", "long_factor"):  # hashable (a static field), as float32 will read them
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))


def rope_attention_factor(scaling: "RopeScaling | None") -> float:
    """The factor transformers multiplies cos and sin by (`attention_scaling`): 1 except for
    `longrope`, where it is `attention_factor`, or else, from `factor`,
    `sqrt(1 + ln(factor) / ln(original_max_position_embeddings))` (1 when `factor <= 1`), as
    `_compute_longrope_parameters` sets it."""
    if scaling is None or scaling.rope_type != "longrope":
        return 1.0
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)
    if scaling.factor is None:
        raise ValueError(
            "rope_scaling: rope_type 'longrope' needs `attention_factor` or `factor` "
            "(this family does not derive `factor` from max_position_embeddings)."
        )
    if scaling.factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(scaling.factor) / math.log(scaling.original_max_position_embeddings))


def longrope_uses_long(scaling: RopeScaling, positions: Int[Array, " seq"]) -> Bool[Array, ""]:
    """Whether a forward call over `positions` uses `long_factor`: `max(positions) + 1 >
    original_max_position_embeddings`, one choice for the whole call, as transformers'
    `longrope_frequency_update` decides it."""
    return jnp.max(positions) + 1 > scaling.original_max_position_embeddings


def rope_inverse_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None = None, *, long: bool = False
) -> np.ndarray:
    r"""The inverse frequencies $\theta^{-2i/d}$, $i < d/2$, as a float32 numpy array.

    Computed in float32 exactly as `transformers.modeling_rope_utils` does, including the
    `linear` (divide by `factor`), `llama3` (per-wavelength interpolation) and `longrope`
    (divide by `short_factor`, or `long_factor` when `long`) rules.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    if scaling is not None and scaling.rope_type == "longrope":  # 1 / (ext * base ** exponent)
        ext = np.asarray(scaling.long_factor if long else scaling.short_factor, np.float32)
        if ext.shape != exponent.shape:
            raise ValueError(
                f"rope_scaling: longrope {'long' if long else 'short'}_factor has {ext.size} entries, "
                f"expected {exponent.size} (rotary dim {head_dim} / 2)."
            )
        return (np.float32(1.0) / (ext * (np.float32(theta) ** exponent))).astype(np.float32)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    if scaling is None or scaling.rope_type == "default":
        return inv_freq
    factor = np.float32(scaling.factor)
    if scaling.rope_type == "linear":
        return (inv_freq / factor).astype(np.float32)
    # llama3: _compute_llama3_parameters.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = (np.float32(old_len) / wavelen - np.float32(scaling.low_freq_factor)) / np.float32(
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


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
    [`RopeScaling`][] or None); `rotary_dim` (default `head_dim`); `interleaved`.
    """

    head_dim: int = eqx.field(static=True)
    theta: float = eqx.field(static=True)
    scaling: RopeScaling | None = eqx.field(static=True, default=None)
    rotary_dim: int | None = eqx.field(static=True, default=None)
    interleaved: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if not 0 < self.dim <= self.head_dim:
            raise ValueError(f"RotaryEmbedding: rotary_dim must be in (0, head_dim={self.head_dim}], got {self.rotary_dim}.")
        if self.scaling is not None and self.scaling.rope_type == "longrope":  # factor lengths, attention factor
            rope_inverse_frequencies(self.frequency_dim, self.theta, self.scaling, long=True)
            rope_inverse_frequencies(self.frequency_dim, self.theta, self.scaling)
            rope_attention_factor(self.scaling)

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
        inv_freq = jnp.asarray(rope_inverse_frequencies(self.frequency_dim, self.theta, self.scaling))
        if self.scaling is not None and self.scaling.rope_type == "longrope":
            long = jnp.asarray(rope_inverse_frequencies(self.frequency_dim, self.theta, self.scaling, long=True))
            inv_freq = jnp.where(longrope_uses_long(self.scaling, positions), long, inv_freq)
        freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
        if self.interleaved:
            angles = jnp.repeat(freqs, 2, axis=-1)
        else:
            angles = jnp.concatenate([freqs, freqs], axis=-1)
        scale = rope_attention_factor(self.scaling)
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
