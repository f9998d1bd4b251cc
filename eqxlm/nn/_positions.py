"""The one interface every position scheme implements, so attention does not care which it has."""

import abc

import equinox as eqx
from jaxtyping import Array, Float, Int


class AbstractPositionScheme(eqx.Module):
    """A position scheme acts in one of two places of attention, and says which:

    - `rotate(x, positions)`: applied to queries and keys before the cache (rotary);
    - `bias(key_positions)`: an additive per-head score bias over the attended keys (ALiBi),
      or None.

    A scheme that does neither (learned absolute positions live in the embeddings) is
    simply no scheme: `Attention(positions=None)`.
    """

    @abc.abstractmethod
    def rotate(self, x: Float[Array, "seq heads head_dim"], positions: Int[Array, " seq"]) -> Float[Array, "seq heads head_dim"]:
        """Queries or keys after the scheme (identity when it only biases)."""

    @abc.abstractmethod
    def bias(self, key_positions: Int[Array, " kv_seq"]) -> Float[Array, "heads kv_seq"] | None:
        """The float32 additive score bias for every head, or None."""
