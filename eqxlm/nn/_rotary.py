"""Rotary position embedding (RoPE) in Hugging Face's rotate-half layout."""

import dataclasses
import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._typing import typecheck
from ._positions import AbstractPositionScheme

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A `rope_scaling` (transformers 4) / `rope_parameters` (transformers 5) entry.

    Only the types whose frequencies eqxlm reproduces exactly are accepted
    (`SUPPORTED_ROPE_TYPES`); any other `rope_type` raises, naming it.

    **Fields:** `rope_type` (`"linear"` or `"llama3"`); `factor`; for `llama3` also
    `low_freq_factor`, `high_freq_factor` and `original_max_position_embeddings`.
    """

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

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


def rope_attention_factor(scaling: "RopeScaling | None") -> float:
    """The factor transformers multiplies cos and sin by (`attention_scaling`): 1 for the
    rope types eqxlm supports today."""
    return 1.0


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    r"""The inverse frequencies $\theta^{-2i/d}$, $i < d/2$, as a float32 numpy array.

    Computed in float32 exactly as `transformers.modeling_rope_utils` does, including the
    `linear` (divide by `factor`) and `llama3` (per-wavelength interpolation) rules.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
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
