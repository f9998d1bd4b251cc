"""Reading, tokenising, packing and feeding training data.

Documents: a `.txt` file holds documents separated by blank lines; a `.jsonl` file holds
one JSON object per line with the text in `text_field`. Each document is tokenised with the
checkpoint's `tokenizer.json`, followed by the EOS token (preceded by BOS when the model has
a BOS distinct from EOS), and the documents are concatenated and cut into windows of
`seq_len` tokens ("packing"; the incomplete last window is dropped for training).

**Packing does not mask attention across documents.** eqxlm's models take one sequence and a
0/1 attention mask whose real tokens are counted for positions, so a window that spans two
documents lets the second attend to the end of the first, separated by EOS; this is what most
causal-LM trainers do (e.g. Hugging Face's `group_texts`). Documents are not split into
held-out and training parts: a seeded choice of whole documents is held out.

Feeding: a Grain pipeline, `MapDataset.range(windows).shuffle(seed).repeat().batch(B)`
(a fresh permutation every epoch, the same for every process), maps each global batch of
window indices to the rows *this process* feeds to its devices, so each process gathers only
its share. Its iterator state (`{"next_index": step}`) is saved in every checkpoint through
Grain's Orbax handler.
"""

import json
import re
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and line)."""


def read_documents(paths, text_field: str = "text") -> list[str]:
    """Every document of every file, in order. Refuses a missing, unreadable or empty file."""
    docs: list[str] = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"data file {path} does not exist.")
        if not path.is_file():
            raise DataError(f"data file {path} is not a file.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
        except OSError as e:
            raise DataError(f"data file {path} cannot be read: {e.strerror or e}.") from None
        found = []
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not valid JSON ({e.msg}).") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise DataError(
                        f"{path}:{number}: no {text_field!r} field (expected an object like {{{text_field!r}: ...}})."
                    )
                if not isinstance(record[text_field], str):
                    raise DataError(
                        f"{path}:{number}: field {text_field!r} is {type(record[text_field]).__name__}, expected a string."
                    )
                if record[text_field].strip():
                    found.append(record[text_field])
        else:
            found = [d.strip() for d in re.split(r"\n[ \t]*\n", text) if d.strip()]
        if not found:
            raise DataError(f"data file {path} is empty (no text to train on).")
        docs.extend(found)
    return docs


def split_documents(docs: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out `round(eval_fraction * n)` whole documents (at least one when the fraction is
    positive and there are two or more), chosen by `seed`. **Returns:** `(train, held_out)`,
    each in the original order."""
    n = len(docs)
    n_eval = 0 if eval_fraction <= 0 or n < 2 else min(n - 1, max(1, round(eval_fraction * n)))
    held = set(np.random.default_rng(seed).permutation(n)[:n_eval].tolist())
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def token_stream(tokenizer, docs: list[str], *, bos: int | None, eos: int) -> np.ndarray:
    """`[BOS] doc EOS` for every document, concatenated (BOS only when it differs from EOS)."""
    prefix = [bos] if bos is not None and bos != eos else []
    parts = [np.asarray(prefix + e.ids + [eos], np.int32) for e in tokenizer.encode_batch(docs, add_special_tokens=False)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def pack(stream: np.ndarray, seq_len: int, *, pad_tail: bool, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cut a token stream into `(n, seq_len)` windows and a 0/1 mask. The last partial window
    is dropped, or (`pad_tail`) padded with masked `pad_id` tokens."""
    n = len(stream) // seq_len
    windows = stream[: n * seq_len].reshape(n, seq_len)
    mask = np.ones_like(windows)
    tail = stream[n * seq_len :]
    if pad_tail and len(tail) > 1:  # one token predicts nothing
        row = np.full((1, seq_len), pad_id, np.int32)
        row[0, : len(tail)] = tail
        row_mask = np.zeros((1, seq_len), np.int32)
        row_mask[0, : len(tail)] = 1
        windows, mask = np.concatenate([windows, row]), np.concatenate([mask, row_mask])
    return windows.astype(np.int32), mask.astype(np.int32)


def process_rows(sharding, global_shape: tuple[int, ...], dim: int) -> list[int]:
    """Indices along `dim` of a global array that this process's devices hold under `sharding`."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        rows.update(range(*index[dim].indices(global_shape[dim])))
    return sorted(rows)


def train_iterator(windows: np.ndarray, *, batch_size: int, seed: int, rows: list[int]):
    """A Grain iterator of this process's rows of each global batch: `rows` index the
    `batch_size` windows of a step. Checkpointable (`get_state` / `set_state`)."""
    import grain

    picked = np.asarray(rows, np.int64)
    dataset = (
        grain.MapDataset.range(len(windows)).shuffle(seed=seed).repeat().batch(batch_size).map(lambda ids: windows[ids[picked]])
    )
    return iter(dataset.to_iter_dataset())


def global_batch(local: np.ndarray, rows: list[int], global_shape: tuple[int, ...], sharding, dim: int):
    """Assemble a global `jax.Array` from this process's `rows` (along `dim`) of it."""
    import jax

    where = {r: i for i, r in enumerate(rows)}

    def fetch(index):
        wanted = range(*index[dim].indices(global_shape[dim]))
        block = np.take(local, [where[r] for r in wanted], axis=dim)
        rest = tuple(s if d != dim else slice(None) for d, s in enumerate(index))
        return block[rest]

    return jax.make_array_from_callback(global_shape, sharding, fetch)
