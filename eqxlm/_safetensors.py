"""Reading safetensors files exactly, with every failure named.

A safetensors file is an 8-byte little-endian header length, a JSON header
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`) and
the tensors' bytes. [`SafetensorsFile`][] validates the whole header when it opens a file
(lengths, JSON, dtypes, shapes against offsets, offsets inside the file and not
overlapping), so a truncated or corrupt file fails before anything is read, with an error
that names the file and the tensor. Tensors are then had in one of three ways:

- [`SafetensorsFile.view`][]: a read-only array over the file's own pages (one shared memory
  map per file, alive as long as any view of it). Nothing is copied or read until the pages
  are used. XLA:CPU adopts a host buffer without copying only when its address is a multiple
  of 64 bytes ([`ALIGN`][]), and a mapped tensor's address is its file offset modulo the page
  size, so this is for tensors whose offset is 64-byte aligned ([`SafetensorsFile.aligned`][]);
- [`SafetensorsFile.read`][]: whole, by leading-axis rows, or cast to another dtype, into a
  fresh 64-byte aligned buffer with plain file I/O (a cast goes through a bounded scratch
  buffer, `chunk` bytes at a time), so that XLA:CPU adopts the result without a second copy;
- by an arbitrary box of slices (one device's shard of a mesh) copied, and cast, out of a
  short-lived memory map that touches only the box's pages.

bfloat16 is read as raw 16-bit words and viewed as `ml_dtypes.bfloat16`, because a
`memoryview` cannot take an ml_dtypes buffer (`cannot include dtype 'E' in a buffer`).

Also here: the dtype policy of a load ([`target_dtype`][], [`cast`][]), the sharded index
reader ([`read_index`][]) and the JSON reader that names file, line and column
([`read_json`][]). Every error is a [`CheckpointError`][] (a `ValueError`).
"""

import json
import math
import mmap
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and every
    bad tensor, with what was expected and what was found."""


#: safetensors dtype -> (numpy dtype of the values, numpy dtype the bytes are read as).
DTYPES: dict[str, tuple[np.dtype, np.dtype]] = {
    "F64": (np.dtype(np.float64), np.dtype(np.float64)),
    "F32": (np.dtype(np.float32), np.dtype(np.float32)),
    "F16": (np.dtype(np.float16), np.dtype(np.float16)),
    "BF16": (np.dtype(ml_dtypes.bfloat16), np.dtype(np.uint16)),
    "F8_E4M3": (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(np.uint8)),
    "F8_E5M2": (np.dtype(ml_dtypes.float8_e5m2), np.dtype(np.uint8)),
    "I64": (np.dtype(np.int64), np.dtype(np.int64)),
    "I32": (np.dtype(np.int32), np.dtype(np.int32)),
    "I16": (np.dtype(np.int16), np.dtype(np.int16)),
    "I8": (np.dtype(np.int8), np.dtype(np.int8)),
    "U64": (np.dtype(np.uint64), np.dtype(np.uint64)),
    "U32": (np.dtype(np.uint32), np.dtype(np.uint32)),
    "U16": (np.dtype(np.uint16), np.dtype(np.uint16)),
    "U8": (np.dtype(np.uint8), np.dtype(np.uint8)),
    "BOOL": (np.dtype(np.bool_), np.dtype(np.bool_)),
}
#: Stored dtypes a float weight may be loaded from (cast exactly as numpy/ml_dtypes cast:
#: round to nearest even). float8 is a quantised format that needs scales: refused.
FLOAT_WEIGHTS = ("F64", "F32", "F16", "BF16")
#: The dtypes a model can be loaded in, by name.
LOAD_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
#: XLA:CPU uses a host buffer in place (no copy) when its address is a multiple of this.
ALIGN = 64
#: Casts are done through a scratch buffer of at most this many bytes.
CHUNK_BYTES = 16 * 2**20
#: Header lengths above this are refused (the safetensors library's own limit).
MAX_HEADER = 100 * 2**20


def _plural(items: list[str], limit: int = 6, sep: str = ", ") -> str:
    shown = sep.join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def read_json(path: Path, what: str = "file") -> Any:
    """Parse a JSON file; invalid JSON is a `CheckpointError` naming the file, line and column."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not a UTF-8 text {what} ({e.reason} at byte {e.start}).") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}.") from None


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an [`ALIGN`][]-byte boundary
    (numpy's own allocations are only 16-byte aligned, which XLA:CPU copies)."""
    dtype = np.dtype(dtype)
    shape = tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


class TensorInfo:
    """One header entry: stored dtype name, shape and byte range within the data."""

    __slots__ = ("dtype", "shape", "start", "end")

    def __init__(self, dtype: str, shape: tuple[int, ...], start: int, end: int):
        self.dtype, self.shape, self.start, self.end = dtype, shape, start, end

    @property
    def numpy_dtype(self) -> np.dtype:
        return DTYPES[self.dtype][0]


class SafetensorsFile:
    """One safetensors file, its header validated on construction.

    **Arguments:** `path`. **Raises** `CheckpointError` naming the file (and the tensor)
    for: a file shorter than its header, a header length past the end of the file, a
    header that is not a JSON object of entries, an unknown dtype, a shape that is not a
    list of non-negative ints, `data_offsets` that do not hold `prod(shape) * itemsize`
    bytes, lie outside the file (truncated) or overlap another tensor's.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._map: mmap.mmap | None = None  # opened by view()
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: {size} bytes, too short for a safetensors file (8-byte header length).")
            length = int.from_bytes(head, "little")
            if length > min(size - 8, MAX_HEADER):
                raise CheckpointError(
                    f"{self.path}: header length field says {length} bytes, but "
                    + (
                        f"the file has only {size - 8} after it (truncated or not safetensors)."
                        if length > size - 8
                        else f"the limit is {MAX_HEADER}."
                    )
                )
            raw = fh.read(length)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: the {length}-byte header is not valid JSON ({e}).") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: the header is JSON {type(header).__name__}, expected an object.")
        self.data_start = 8 + length
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, TensorInfo] = {name: self._entry(name, e, size) for name, e in header.items()}
        # As the safetensors library requires: the tensors tile the data exactly, no gaps,
        # no overlaps, nothing after them (a header length off by a few bytes is caught here).
        covered = 0
        for start, end, name in sorted((i.start, i.end, n) for n, i in self.entries.items()):
            if start != covered:
                what = "overlaps the tensor before it" if start < covered else f"starts at {start}, leaving a gap after {covered}"
                raise CheckpointError(f"{self.path}: tensor {name}: its data {what} (data_offsets).")
            covered = end
        if covered != size - self.data_start:
            raise CheckpointError(
                f"{self.path}: the tensors hold {covered} bytes, but {size - self.data_start} follow the header "
                "(a wrong header length, or bytes appended)."
            )

    def _entry(self, name: str, entry: Any, size: int) -> TensorInfo:
        where = f"{self.path}: tensor {name}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise CheckpointError(f"{where}: header entry must have dtype, shape and data_offsets, found {entry!r:.80}.")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r:.40} (known: {', '.join(DTYPES)}).")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative ints, found {shape!r:.80}.")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
            raise CheckpointError(f"{where}: data_offsets must be two non-negative ints, found {offsets!r:.80}.")
        start, end = offsets
        nbytes = math.prod(shape) * DTYPES[dtype][1].itemsize
        if end - start != nbytes:
            raise CheckpointError(
                f"{where}: shape {tuple(shape)} of {dtype} needs {nbytes} bytes, "
                f"data_offsets [{start}, {end}] hold {end - start}."
            )
        if self.data_start + end > size:
            raise CheckpointError(
                f"{where}: its data ends at byte {self.data_start + end}, past the end of the file ({size} bytes): truncated."
            )
        return TensorInfo(dtype, tuple(shape), start, end)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def aligned(self, name: str) -> bool:
        """Whether tensor `name` is non-empty and starts on an [`ALIGN`][]-byte boundary of the
        file (so a memory-mapped view of it can be handed to XLA:CPU without a copy)."""
        info = self.entries[name]
        return info.end > info.start and (self.data_start + info.start) % ALIGN == 0

    def view(self, name: str) -> np.ndarray:
        """Tensor `name` as a read-only array over the file's own pages: one shared,
        read-only memory map of the file, opened on first use and kept open for as long as any
        view of it lives. Nothing is read until the values are used. The file must not be
        rewritten in place meanwhile (replacing it, as `save_pretrained` does, is safe)."""
        info = self.entries[name]
        value_dtype, storage = DTYPES[info.dtype]
        if self._map is None:
            with open(self.path, "rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        count = math.prod(info.shape)
        if self.data_start + info.end > len(self._map):
            raise CheckpointError(
                f"{self.path}: tensor {name}: its data ends at byte {self.data_start + info.end}, but the file now "
                f"has {len(self._map)} (the file shrank?)."
            )
        flat = np.frombuffer(self._map, dtype=storage, count=count, offset=self.data_start + info.start)
        return flat.reshape(info.shape).view(value_dtype)

    def read(
        self,
        name: str,
        index: slice | tuple[slice, ...] | None = None,
        dtype=None,
        chunk: int = CHUNK_BYTES,
        cast_into=None,
    ) -> np.ndarray:
        """Tensor `name` in a fresh, [`ALIGN`][]-byte aligned numpy buffer of `dtype` (default:
        its stored dtype; otherwise cast as [`cast`][] does, `chunk` bytes at a time through a
        scratch buffer, so a cast never holds a second whole copy).

        `index`: None (the whole tensor), a `slice` of leading-axis rows, or a tuple of
        step-1 slices, one per axis (a device's shard): only those bytes are read.
        `cast_into(out, values)`: how a chunk is cast into its flat slice of the result
        (default: numpy's assignment)."""
        info = self.entries[name]
        value_dtype, storage = DTYPES[info.dtype]
        target = value_dtype if dtype is None else np.dtype(dtype)
        shape = list(info.shape)
        if isinstance(index, tuple):
            index = index + (slice(None),) * (len(shape) - len(index))
            bounds = [s.indices(n) for s, n in zip(index, shape, strict=True)]
            if any(step != 1 for _, _, step in bounds):
                raise ValueError(f"{name}: only step-1 slices can be read, got {index}.")
            if all(b == (0, n, 1) for b, n in zip(bounds[1:], shape[1:], strict=True)):
                index = slice(*bounds[0][:2]) if shape else None
            else:
                return self._read_box(info, [(a, b) for a, b, _ in bounds], target, cast_into)
        start, end = info.start, info.end
        if isinstance(index, slice) and shape:
            row_bytes = storage.itemsize * math.prod(shape[1:])
            first, stop, step = index.indices(shape[0])
            if step != 1:
                raise ValueError(f"{name}: only step-1 row ranges can be read, got {index}.")
            stop = max(first, stop)
            start, end = start + first * row_bytes, start + stop * row_bytes
            shape[0] = stop - first
        out = aligned_empty(shape, target)
        if not out.size:
            return out
        with open(self.path, "rb") as fh:
            fh.seek(self.data_start + start)
            if target == value_dtype:  # straight from the file into the buffer XLA will adopt
                got = fh.readinto(memoryview(out.view(storage).reshape(-1)).cast("B"))
            else:
                flat, got = out.reshape(-1), 0
                step = max(16, chunk // storage.itemsize // 16 * 16)  # every chunk 64-byte aligned
                scratch = aligned_empty((min(step, flat.size),), storage)
                for pos in range(0, flat.size, step):
                    part = scratch[: min(step, flat.size - pos)]
                    n = fh.readinto(memoryview(part).cast("B"))
                    got += n
                    if n != part.nbytes:
                        break
                    if cast_into is None:
                        flat[pos : pos + part.size] = part.view(value_dtype)
                    else:
                        cast_into(flat[pos : pos + part.size], part.view(value_dtype))
        if got != end - start:
            raise CheckpointError(f"{self.path}: tensor {name}: read {got} of {end - start} bytes (the file shrank?).")
        return out

    def _read_box(self, info: TensorInfo, bounds: list[tuple[int, int]], target: np.dtype, cast_into=None) -> np.ndarray:
        """A box of a tensor (a device's shard), copied and cast into an aligned buffer out of
        a temporary read-only memory map of the tensor: only the pages the box touches are
        read, at C speed, and the map is dropped before returning, so no page stays resident."""
        value_dtype, storage = DTYPES[info.dtype]
        index = tuple(slice(a, b) for a, b in bounds)
        out = aligned_empty([b - a for a, b in bounds], target)
        if info.end == info.start:
            return out
        mapped = np.memmap(self.path, dtype=storage, mode="r", offset=self.data_start + info.start, shape=info.shape)
        if cast_into is None or target == value_dtype:
            np.copyto(out, mapped[index].view(value_dtype), casting="unsafe")
        else:
            cast_into(out.reshape(-1), np.ascontiguousarray(mapped[index]).view(value_dtype).reshape(-1))
        del mapped
        return out


# -- dtypes --------------------------------------------------------------------------------
def dtype_name(dtype: np.dtype) -> str:
    return np.dtype(dtype).name


def stored_name(dtype) -> str:
    """The safetensors name of numpy `dtype` (`"F32"`, `"BF16"`, `"I8"`)."""
    return next(name for name, (values, _) in DTYPES.items() if values == np.dtype(dtype))


def target_dtype(requested, config_raw: dict[str, Any], stored: set[str], config_path: Path) -> np.dtype:
    """The one dtype every weight of a load ends in.

    - `requested` (a dtype or its name) when given;
    - else the config's `dtype` (transformers 5) or `torch_dtype` (4) when it is one of
      float32 / bfloat16 / float16 (`"auto"` or absent: next rule; anything else refused);
    - else the stored weights' dtype (float64 is loaded as float32, since JAX is 32-bit by
      default); stored weights of several float dtypes give the narrowest dtype that holds
      each of them exactly, the widest of them: float32 for float16 with bfloat16.
    """
    if requested is not None:
        key = requested if isinstance(requested, str) else np.dtype(requested).name
        if key not in LOAD_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(LOAD_DTYPES)}, got {requested!r}.")
        return LOAD_DTYPES[key]
    for field in ("dtype", "torch_dtype"):
        value = config_raw.get(field)
        if value is None or value == "auto":
            continue
        if value not in LOAD_DTYPES:
            from .models._config import ConfigError

            raise ConfigError(
                f'{config_path}: {field}: expected one of {", ".join(LOAD_DTYPES)} (or "auto"), got {value!r:.40}; '
                "pass dtype= to from_pretrained to choose one."
            )
        return LOAD_DTYPES[value]
    floats = {s for s in stored if s in FLOAT_WEIGHTS}
    if not floats or floats & {"F64", "F32"} or floats == {"F16", "BF16"}:
        return LOAD_DTYPES["float32"]
    return LOAD_DTYPES["bfloat16" if floats == {"BF16"} else "float16"]


def check_float(file: Path, name: str, stored: str, target: np.dtype) -> str | None:
    """A problem line when tensor `name`, stored as `stored`, cannot be a float weight."""
    if stored in FLOAT_WEIGHTS:
        return None
    return f"{file.name}: {name}: stored as {stored}, expected a float weight (F32, F16 or BF16) to load as {dtype_name(target)}"


def cast(array: np.ndarray, target: np.dtype) -> np.ndarray:
    """`array` in `target` (round to nearest even, as numpy/ml_dtypes and torch cast)."""
    return array if array.dtype == target else array.astype(target)


# -- sharded index -------------------------------------------------------------------------
def read_index(index: Path) -> dict[str, Path]:
    """`model.safetensors.index.json` -> tensor name -> shard path, every shard checked:
    invalid JSON, no `weight_map`, entries that are not file names in the folder, shards
    that do not exist, and tensors listed for a shard that lacks them (or present in a
    shard but not listed) are `CheckpointError`s naming the files and tensors."""
    raw = read_json(index, "index")
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict):
        found = (
            "no weight_map"
            if not isinstance(raw, dict) or "weight_map" not in raw
            else f"weight_map of type {type(weight_map).__name__}"
        )
        raise CheckpointError(f"{index}: expected an object with a weight_map {{tensor: shard file}}, found {found}.")
    folder = index.parent
    bad = [f"{k!r:.60}: {v!r:.60}" for k, v in weight_map.items() if not isinstance(v, str) or Path(v).name != v or not v]
    if bad:
        raise CheckpointError(f"{index}: weight_map values must be file names in {folder.name}/, found {_plural(bad)}.")
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    missing = sorted(s for s in by_shard if not (folder / s).is_file())
    if missing:
        raise CheckpointError(
            f"{index}: shard(s) named in the index do not exist: {_plural(missing)} (for tensors "
            f"{_plural(sorted(by_shard[missing[0]]), 3)}, ...)."
        )
    return {name: folder / shard for name, shard in weight_map.items()}


def check_index(index: Path, files: dict[str, Path], readers: dict[Path, SafetensorsFile]) -> None:
    """Every tensor the index lists is in its shard; every tensor of a shard is listed."""
    problems = []
    for name, path in files.items():
        if name not in readers[path]:
            problems.append(f"{name} is listed for {path.name}, which does not contain it")
    for path, reader in readers.items():
        for name in reader.keys():
            if files.get(name) != path:
                where = f"listed for {files[name].name}" if name in files else "not listed in the index"
                problems.append(f"{name} is in {path.name} but {where}")
    if problems:
        raise CheckpointError(
            f"{index} does not match its shards: "
            + "; ".join(problems[:6])
            + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
            + "."
        )
