"""The key/value cache of one attention layer: a small functional pytree."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .._typing import typecheck


class KVCache(eqx.Module):
    """Keys and values of one attention layer for one sequence, preallocated.

    Passed into an attention call and returned updated, never mutated. Every entry records
    its **slot** (index of the token in the sequence; `-1` for an empty entry or a padding
    token, which therefore never gets attended) and its **position** (the position id used
    for ALiBi; rotary keys are stored already rotated). Masks are then computed from the
    stored slots, so the same code serves two layouts:

    - linear (`rolling=False`): entry `s` holds slot `s`; `size` must cover prompt plus
      generated tokens.
    - rolling (`rolling=True`, sliding-window models): entry `s % size` holds slot `s`,
      with `size >= window`, so memory is O(window) however long generation runs. The
      attention reads the old entries *and* the new block before writing, so a prompt
      longer than the window still sees every key it should.

    Batch with `jax.vmap` like everything else in eqxlm (see `KVCache.init`).
    """

    keys: Float[Array, "cache kv_heads head_dim"]
    values: Float[Array, "cache kv_heads head_dim"]
    slots: Int[Array, " cache"]
    positions: Int[Array, " cache"]
    end: Int[Array, ""]
    next_position: Int[Array, ""]
    rolling: bool = eqx.field(static=True)

    @classmethod
    def init(cls, size: int, num_kv_heads: int, head_dim: int, *, dtype=jnp.float32, rolling: bool = False) -> "KVCache":
        """An empty cache of `size` entries."""
        return cls(
            keys=jnp.zeros((size, num_kv_heads, head_dim), dtype),
            values=jnp.zeros((size, num_kv_heads, head_dim), dtype),
            slots=jnp.full((size,), -1, jnp.int32),
            positions=jnp.zeros((size,), jnp.int32),
            end=jnp.zeros((), jnp.int32),
            next_position=jnp.zeros((), jnp.int32),
            rolling=rolling,
        )

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @typecheck
    def update(
        self,
        keys: Float[Array, "seq kv_heads head_dim"],
        values: Float[Array, "seq kv_heads head_dim"],
        valid: Bool[Array, " seq"],
        positions: Int[Array, " seq"],
    ) -> tuple[
        "KVCache",
        Float[Array, "kv_seq kv_heads head_dim"],
        Float[Array, "kv_seq kv_heads head_dim"],
        Int[Array, " kv_seq"],
        Int[Array, " kv_seq"],
    ]:
        """Write a block of `seq` tokens at slots `end, end+1, ...`.

        **Returns:** the new cache, and the keys, values, slots and positions the block's
        queries attend over (the whole cache when linear; old entries plus the block when
        rolling).
        """
        seq = keys.shape[0]
        keys = keys.astype(self.keys.dtype)
        values = values.astype(self.values.dtype)
        block_slots = self.end + jnp.arange(seq, dtype=jnp.int32)
        stored_slots = jnp.where(valid, block_slots, -1)
        n_real = jnp.sum(valid, dtype=jnp.int32)
        if not self.rolling:
            # Checked on the scalar write index, not on the keys: the error's host callback
            # then never touches (or, under sharding, gathers) a large array.
            end = eqx.error_if(
                self.end,
                self.end + seq > self.size,
                "KVCache overflow: the block does not fit in the cache; "
                "allocate a larger cache (prompt length + max_new_tokens).",
            )
            start = (end,)
            new = KVCache(
                keys=jax.lax.dynamic_update_slice(self.keys, keys, start + (0, 0)),
                values=jax.lax.dynamic_update_slice(self.values, values, start + (0, 0)),
                slots=jax.lax.dynamic_update_slice(self.slots, stored_slots, start),
                positions=jax.lax.dynamic_update_slice(self.positions, positions, start),
                end=self.end + seq,
                next_position=self.next_position + n_real,
                rolling=False,
            )
            return new, new.keys, new.values, new.slots, new.positions
        # Rolling buffer: attend over old entries + block, then keep the last `size` slots.
        att_keys = jnp.concatenate([self.keys, keys])
        att_values = jnp.concatenate([self.values, values])
        att_slots = jnp.concatenate([self.slots, stored_slots])
        att_positions = jnp.concatenate([self.positions, positions])
        keep = min(seq, self.size)
        index = (block_slots[seq - keep :]) % self.size
        new = KVCache(
            keys=self.keys.at[index].set(keys[seq - keep :], unique_indices=True),
            values=self.values.at[index].set(values[seq - keep :], unique_indices=True),
            slots=self.slots.at[index].set(stored_slots[seq - keep :], unique_indices=True),
            positions=self.positions.at[index].set(positions[seq - keep :], unique_indices=True),
            end=self.end + seq,
            next_position=self.next_position + n_real,
            rolling=True,
        )
        return new, att_keys, att_values, att_slots, att_positions
