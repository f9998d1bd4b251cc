"""ALiBi: attention with linear biases (BLOOM)."""

import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._typing import typecheck
from ._positions import AbstractPositionScheme


def alibi_slopes(num_heads: int) -> np.ndarray:
    r"""The per-head ALiBi slopes, a float32 numpy array of length `num_heads`.

    With $p = 2^{\lfloor \log_2 n \rfloor}$ and $b = 2^{-2^{-(\log_2 p - 3)}}$ the first
    $p$ slopes are $b^1, \dots, b^p$. When $n$ is not a power of two, the remaining
    $n - p$ heads take the odd powers $1, 3, 5, \dots$ of $2^{-2^{-(\log_2 2p - 3)}}$.
    Mirrors `transformers.models.bloom.modeling_bloom._get_alibi_slopes`, including the
    branch for head counts that are not powers of two (6, 12, ...).
    """
    if num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be positive, got {num_heads}.")
    closest = 2 ** math.floor(math.log2(num_heads))
    base = np.float32(2 ** (-(2 ** -(math.log2(closest) - 3))))
    slopes = [np.float32(base**k) for k in range(1, closest + 1)]
    if closest != num_heads:
        extra_base = np.float32(2 ** (-(2 ** -(math.log2(2 * closest) - 3))))
        remaining = min(closest, num_heads - closest)
        slopes += [np.float32(extra_base**k) for k in range(1, 1 + 2 * remaining, 2)]
    return np.asarray(slopes, dtype=np.float32)


class ALiBi(AbstractPositionScheme):
    r"""ALiBi bias from per-key positions: $\mathrm{bias}_{h,j} = m_h \cdot \mathrm{pos}_j$.

    BLOOM adds `slope * key_position` to every query's scores, relying on the softmax
    being shift-invariant per row instead of using $-(i - j)$. Key positions count real
    tokens only (`(cumsum(mask) - 1) * mask`), so a left-padded row gets the same biases
    as the unpadded one. The bias is built in float32; the attention casts it to the
    compute dtype before adding it, as `build_alibi_tensor(..., dtype)` does.
    """

    num_heads: int = eqx.field(static=True)

    @typecheck
    def __call__(self, key_positions: Int[Array, " kv_seq"]) -> Float[Array, "heads kv_seq"]:
        """**Arguments:** `key_positions`. **Returns:** the float32 bias for every head."""
        slopes = jnp.asarray(alibi_slopes(self.num_heads))
        return slopes[:, None] * key_positions.astype(jnp.float32)[None, :]

    def rotate(self, x, positions):
        return x

    def bias(self, key_positions):
        return self(key_positions)
