"""The KV cache: per-layer keys and values, plus one slot table per attention kind.

A cache is a small functional pytree, passed into a forward call and returned updated,
never mutated. It is split in two because only one part differs between layers:

- [`KVCache`][]: one layer's keys and values (rotary keys are stored already rotated);
- [`SlotTable`][]: which token each cache entry holds (its **slot**, the index of the token
  in the padded sequence, `-1` for an empty entry or padding, and its **position** id, for
  ALiBi). Every layer of the same attention kind (full causal, or one sliding window) has
  the same table, so the table is kept once per kind and the masks are built from it once
  per forward, not once per layer.

Two layouts share the code:

- linear (`rolling=False`): entry `s` holds slot `s`; the size covers prompt plus
  generated tokens;
- rolling (`rolling=True`, sliding-window layers): entry `s % size` holds slot `s`, with
  `size >= window`, so memory is O(window) however long generation runs. A block's
  queries attend over the old entries *and* the block before it is written, so a prompt
  longer than the window still sees every key it should.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .._typing import typecheck


class CacheWrite(eqx.Module):
    """Where a block of `seq` tokens goes in the caches of one attention kind (computed once
    per forward by [`SlotTable.advance`][] and used by every layer of that kind)."""

    start: Int[Array, ""]
    index: Int[Array, " keep"] | None
    rolling: bool = eqx.field(static=True)


class KVCache(eqx.Module):
    """Keys and values of one attention layer for one sequence, preallocated.

    Batch with `jax.vmap` like everything else in eqxlm.
    """

    keys: Float[Array, "cache kv_heads head_dim"]
    values: Float[Array, "cache kv_heads head_dim"]

    @classmethod
    def init(cls, size: int, num_kv_heads: int, head_dim: int, *, dtype=jnp.float32) -> "KVCache":
        """An empty cache of `size` entries."""
        zeros = jnp.zeros((size, num_kv_heads, head_dim), dtype)
        return cls(keys=zeros, values=zeros)

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @typecheck
    def update(
        self, write: CacheWrite, keys: Float[Array, "seq kv_heads head_dim"], values: Float[Array, "seq kv_heads head_dim"]
    ) -> tuple["KVCache", Float[Array, "kv_seq kv_heads head_dim"], Float[Array, "kv_seq kv_heads head_dim"]]:
        """Write a block as `write` says. **Returns:** the new cache and the keys and values
        the block's queries attend over (the whole cache when linear; old entries plus the
        block when rolling)."""
        keys = keys.astype(self.keys.dtype)
        values = values.astype(self.values.dtype)
        if not write.rolling:
            new = KVCache(
                keys=jax.lax.dynamic_update_slice(self.keys, keys, (write.start, 0, 0)),
                values=jax.lax.dynamic_update_slice(self.values, values, (write.start, 0, 0)),
            )
            return new, new.keys, new.values
        keep = write.index.shape[0]
        seq = keys.shape[0]
        new = KVCache(
            keys=self.keys.at[write.index].set(keys[seq - keep :], unique_indices=True),
            values=self.values.at[write.index].set(values[seq - keep :], unique_indices=True),
        )
        return new, jnp.concatenate([self.keys, keys]), jnp.concatenate([self.values, values])


class SlotTable(eqx.Module):
    """The slot and position of every cache entry of one attention kind."""

    slots: Int[Array, " cache"]
    positions: Int[Array, " cache"]
    rolling: bool = eqx.field(static=True)

    @classmethod
    def init(cls, size: int, *, rolling: bool = False) -> "SlotTable":
        return cls(slots=jnp.full((size,), -1, jnp.int32), positions=jnp.zeros((size,), jnp.int32), rolling=rolling)

    @property
    def size(self) -> int:
        return self.slots.shape[0]

    @typecheck
    def advance(
        self, end: Int[Array, ""], valid: Bool[Array, " seq"], positions: Int[Array, " seq"]
    ) -> tuple["SlotTable", Int[Array, " kv_seq"], Int[Array, " kv_seq"], CacheWrite]:
        """Record a block of `seq` tokens at slots `end, end+1, ...`.

        **Returns:** the new table, the slots and positions of the keys the block attends
        over, and where every layer of this kind writes its keys and values.
        """
        seq = valid.shape[0]
        block = jnp.where(valid, end + jnp.arange(seq, dtype=jnp.int32), -1)
        if not self.rolling:
            # Checked on the scalar write index: the error's host callback then never touches
            # (or, under sharding, gathers) a large array.
            start = eqx.error_if(
                end,
                end + seq > self.size,
                "KVCache overflow: the block does not fit in the cache; "
                "allocate a larger cache (prompt length + max_new_tokens).",
            )
            new = SlotTable(
                slots=jax.lax.dynamic_update_slice(self.slots, block, (start,)),
                positions=jax.lax.dynamic_update_slice(self.positions, positions, (start,)),
                rolling=False,
            )
            return new, new.slots, new.positions, CacheWrite(start=start, index=None, rolling=False)
        keep = min(seq, self.size)
        index = (end + jnp.arange(seq - keep, seq, dtype=jnp.int32)) % self.size
        new = SlotTable(
            slots=self.slots.at[index].set(block[seq - keep :], unique_indices=True),
            positions=self.positions.at[index].set(positions[seq - keep :], unique_indices=True),
            rolling=True,
        )
        key_slots = jnp.concatenate([self.slots, block])
        key_positions = jnp.concatenate([self.positions, positions])
        return new, key_slots, key_positions, CacheWrite(start=end, index=index, rolling=True)


class Cache(eqx.Module):
    """A whole model's cache for one sequence: every layer's [`KVCache`][] (in the same
    container layout as the model's layers: a tuple, or stacked per scanned segment), one
    [`SlotTable`][] per attention kind, the number of slots used (`end`) and the position
    the next real token gets (`next_position`).

    Make one with `model.init_cache(max_length)`; batch it with
    `jax.tree.map(lambda x: jnp.broadcast_to(x, (batch, *x.shape)), cache)` and `jax.vmap`.
    """

    layers: Any
    tables: tuple[SlotTable, ...]
    end: Int[Array, ""]
    next_position: Int[Array, ""]
    #: The sliding window of each table's attention kind (None = full causal).
    windows: tuple[int | None, ...] = eqx.field(static=True)
