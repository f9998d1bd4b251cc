"""Boolean attention masks as small composable functions.

A mask is `True` where a query may attend to a key. Queries and keys are identified by
their **slots**: the index of the token in the (padded) sequence, which for a cached
decode step continues past the prompt (a block of queries starting at an offset into the
key sequence is just `query_slots = offset + arange(seq)`). Slots are not positions:
position ids count real tokens only, slots count every token, padding included, which is
what Hugging Face's `masking_utils` compares for causal and sliding-window masks.

Combine masks with `&` (they broadcast: `padding_mask` has a query axis of size 1).
"""

from jaxtyping import Array, Bool, Int

from .._typing import typecheck


@typecheck
def causal_mask(query_slots: Int[Array, " seq"], key_slots: Int[Array, " kv_seq"]) -> Bool[Array, "seq kv_seq"]:
    """Query `i` sees keys `j <= i`."""
    return key_slots[None, :] <= query_slots[:, None]


@typecheck
def sliding_window_mask(
    query_slots: Int[Array, " seq"], key_slots: Int[Array, " kv_seq"], window: int
) -> Bool[Array, "seq kv_seq"]:
    """Query `i` sees keys `j` with `i - window < j <= i`: `window` keys, itself included.

    This is transformers' PyTorch rule (`masking_utils`: `kv_idx > q_idx - sliding_window`).
    The old Flax Mistral port used `triu(causal, k=-W)`, which sees one key more.
    """
    if window < 1:
        raise ValueError(f"sliding_window_mask: window must be >= 1, got {window}.")
    q = query_slots[:, None]
    k = key_slots[None, :]
    return (k <= q) & (k > q - window)


@typecheck
def padding_mask(key_valid: Bool[Array, " kv_seq"]) -> Bool[Array, "1 kv_seq"]:
    """No query sees a padded (or empty-cache) key. Broadcasts over queries."""
    return key_valid[None, :]


@typecheck
def attention_mask(
    query_slots: Int[Array, " seq"],
    key_slots: Int[Array, " kv_seq"],
    key_valid: Bool[Array, " kv_seq"] | None = None,
    sliding_window: int | None = None,
) -> Bool[Array, "seq kv_seq"]:
    """The decoder mask: causal (or sliding-window when `sliding_window` is an int), and
    padding when `key_valid` is given."""
    if sliding_window is None:
        mask = causal_mask(query_slots, key_slots)
    else:
        mask = sliding_window_mask(query_slots, key_slots, sliding_window)
    if key_valid is not None:
        mask = mask & padding_mask(key_valid)
    return mask
