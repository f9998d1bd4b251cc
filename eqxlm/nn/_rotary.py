"""Rotary position embedding (RoPE) in Hugging Face's rotate-half layout."""

import dataclasses
import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._typing import typecheck

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


class RotaryEmbedding(eqx.Module):
    r"""Rotary position embedding, rotate-half layout, from explicit per-token positions.

    For a head vector $x = [x_1; x_2]$ (two halves) at position $p$, with angles
    $\phi = p \cdot f$ for the inverse frequencies $f$ duplicated over both halves:

    $$\mathrm{rope}(x, p) = x \cos\phi + [-x_2; x_1] \sin\phi$$

    Angles are computed in float32 from the integer positions and only then cast to the
    input dtype, as `LlamaRotaryEmbedding` does. Because positions are explicit, a
    left-padded row or a cached decode step needs nothing special: pass each token's own
    position. Nothing is stored but three static numbers; the frequency table is a
    compile-time constant.

    **Arguments (constructor):** `head_dim` (even; HF `head_dim`, which may differ from
    hidden/heads), `theta` (HF `rope_theta`), `scaling` (a [`RopeScaling`][] or None).
    """

    head_dim: int = eqx.field(static=True)
    theta: float = eqx.field(static=True)
    scaling: RopeScaling | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {self.head_dim}.")

    @typecheck
    def cos_sin(self, positions: Int[Array, " seq"]) -> tuple[Float[Array, "seq head_dim"], Float[Array, "seq head_dim"]]:
        """The float32 cosine and sine tables for `positions` (each `seq x head_dim`)."""
        inv_freq = jnp.asarray(rope_inverse_frequencies(self.head_dim, self.theta, self.scaling))
        freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
        angles = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(angles), jnp.sin(angles)

    @typecheck
    def __call__(
        self, x: Float[Array, "seq heads head_dim"], positions: Int[Array, " seq"]
    ) -> Float[Array, "seq heads head_dim"]:
        """**Arguments:** `x` (queries or keys), `positions` of each token.
        **Returns:** `x` rotated, in `x`'s dtype."""
        cos, sin = self.cos_sin(positions)
        cos = cos.astype(x.dtype)[:, None, :]
        sin = sin.astype(x.dtype)[:, None, :]
        half = self.head_dim // 2
        rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin
