"""Hugging Face checkpoints in and out: `config.json` + safetensors, single or sharded.

Parameter names (`eqxlm.params`) are the builder's attribute paths
(`model.layers.0.self_attn.q_proj.weight`), which are Llama's checkpoint keys; each family's
key map (`model.key_map()`) says how its checkpoints differ (renamed modules, fused or
transposed projections, alternative spellings). Works for any model that implements
`eqxlm.models.AbstractCausalLM` and is registered.

[`fill`][] is the one loading path: `from_pretrained`, `eqxlm.load_quantized` and
`eqxlm.lora.load_adapter` each build an abstract skeleton, say what every stored tensor must be
and which leaves it fills ([`Expected`][]), and let it check, read and place the tensors.
"""

import functools
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from tqdm import tqdm

from . import _safetensors as st
from ._memory import check_fits_in_memory
from ._safetensors import CheckpointError
from .default import DEFAULT_MODEL, default_model_path
from .models import AbstractCausalLM, ConfigError, GenerationConfig, lookup, supported_model_types
from .models._config import check_field_types
from .params import CheckpointTensor, leaf_specs, param_refs, parameter_count

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
#: The head a tied checkpoint may carry anyway (transformers' name; matched whole, never by suffix).
TIED_HEAD = "lm_head.weight"
#: Files fetched from the hub: configs, safetensors, and the tokenizer (with its chat template).
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    SAFE_INDEX,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]


# -- locating files -----------------------------------------------------------------------
def resolve(path_or_repo_id: str | os.PathLike, *, revision: str | None = None) -> Path:
    """`"eqxlm/default"` is the embedded default model; a local folder is used as is;
    otherwise a hub repo id resolved through `huggingface_hub`
    (its cache and `HF_HUB_OFFLINE=1` honoured), fetching only `HUB_PATTERNS`."""
    if str(path_or_repo_id) == DEFAULT_MODEL:
        return default_model_path()
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{name}: not a checkpoint folder.")
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(huggingface_hub.snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS))
    except HFValidationError:
        raise FileNotFoundError(f"{name}: no such folder, and not a valid hub repo id.") from None
    except Exception as e:  # offline, not cached, network error, gated repo...
        raise FileNotFoundError(f"{name}: no such folder, and the hub could not provide it ({type(e).__name__}: {e}).") from None


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index or the single file."""
    index = folder / SAFE_INDEX
    if index.exists():
        return st.read_index(index)
    single = folder / SAFE_SINGLE
    if single.exists():
        return {name: single for name in st.SafetensorsFile(single).keys()}
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
        raise CheckpointError(
            f"{folder}: only PyTorch pickle weights (.bin/.pt) found. eqxlm reads safetensors only; convert "
            "with transformers: AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, "
            "safe_serialization=True)."
        )
    raise CheckpointError(f"{folder}: no {SAFE_SINGLE} or {SAFE_INDEX}.")


# -- configs ------------------------------------------------------------------------------
def load_config(folder: str | os.PathLike):
    """Read `config.json` into its registered family's frozen config."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder}: no config.json.")
    raw = st.read_json(path, "config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object of config fields, found {type(raw).__name__}.")
    model_type = raw.get("model_type")
    try:
        config_class, _ = lookup(model_type) if isinstance(model_type, str) else lookup("")
    except KeyError:
        raise CheckpointError(
            f"{path}: model_type {model_type!r:.40} is not supported (supported: {', '.join(supported_model_types())})."
        ) from None
    try:
        return config_class.from_hf(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _load_generation_config(folder: Path, config) -> GenerationConfig:
    raw: dict[str, Any] = {}
    path = folder / "generation_config.json"
    if path.exists():
        raw = st.read_json(path, "generation config")
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object of generation settings, found {type(raw).__name__}.")
    eos = raw.get("eos_token_id", config.eos_token_id)
    eos = tuple(eos) if isinstance(eos, list) else (eos,) if isinstance(eos, int) and not isinstance(eos, bool) else eos
    generation = GenerationConfig(
        bos_token_id=raw.get("bos_token_id", config.bos_token_id),
        eos_token_id=eos,
        pad_token_id=raw.get("pad_token_id", config.pad_token_id),
    )
    try:
        check_field_types(generation)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return generation


# -- loading ------------------------------------------------------------------------------
def from_pretrained(
    path_or_repo_id: str | os.PathLike,
    *,
    dtype=None,
    revision: str | None = None,
    progress: bool | None = None,
    mesh=None,
    rules=None,
    scan_layers: bool = False,
) -> AbstractCausalLM:
    """Load a Hugging Face checkpoint as an eqxlm model.

    **Arguments:**
    - `path_or_repo_id`: a folder with `config.json` and safetensors (single file, or
      shards with `model.safetensors.index.json`), or a hub repo id resolved through
      `huggingface_hub` (cache and `HF_HUB_OFFLINE=1` honoured).
    - `dtype`: `jnp.float32`, `jnp.bfloat16`, `jnp.float16` (or their names). Every weight
      ends in this one dtype. Default: the config's `dtype` / `torch_dtype` when it names
      one of these, else the stored weights' dtype (stored weights of mixed float dtypes:
      the widest of them, float32 for float16 with bfloat16; float64: float32). Tensors
      are cast one at a time as they are read (round to nearest even); a non-float tensor
      where a weight belongs is a `CheckpointError` naming it and both dtypes.
    - `revision`: a hub branch, tag or commit.
    - `progress`: show a progress bar (default: for checkpoints over 256 MB).
    - `mesh`, `rules`: place each tensor straight onto its shards of a `jax.sharding.Mesh`
      as it is read, under `rules` (default: the model's `partition_rules()`): each
      device's slice of a plain tensor is read from the file on its own.
    - `scan_layers`: build the layers stacked and run them with `jax.lax.scan` (checkpoint
      keys are the same in both layouts).

    **Returns:** the registered model class of the checkpoint's `model_type` (for the
    builder's families, a `DecoderLM`).

    The model skeleton is built with `eqx.filter_eval_shape` (no random weights are
    allocated) and filled tensor by tensor, so peak memory stays near one copy of the
    weights. Missing, unexpected and misshapen tensors are all reported, by name, in one
    `CheckpointError`.
    """
    folder = resolve(path_or_repo_id, revision=revision)
    config = load_config(folder)
    generation_config = _load_generation_config(folder, config)
    files = _tensor_files(folder)
    _, model_cls = lookup(config.model_type)
    readers = {file: st.SafetensorsFile(file) for file in sorted(set(files.values()))}
    if (folder / SAFE_INDEX).exists():
        st.check_index(folder / SAFE_INDEX, files, readers)
    stored = {name: readers[file] for name, file in files.items()}
    dtypes = {reader.entries[name].dtype for name, reader in stored.items()}
    dtype = st.target_dtype(dtype, st.read_json(folder / "config.json", "config"), dtypes, folder / "config.json")
    extra = {"scan_layers": True} if scan_layers else {}
    skeleton = eqx.filter_eval_shape(
        lambda: model_cls(config, key=jax.random.key(0), dtype=dtype, generation_config=generation_config, **extra)
    )
    key_map = skeleton.key_map()
    ignored = re.compile(key_map.ignored) if key_map.ignored else None
    tied = getattr(config, "tie_word_embeddings", False)

    def skip(file_name: str) -> bool:  # a recomputed buffer, or a tied head saved anyway (it equals the embedding)
        return bool(ignored and ignored.search(file_name)) or (tied and file_name == TIED_HEAD)

    return fill(
        skeleton,
        stored,
        [Expected(t) for t in key_map.checkpoint_tensors(param_refs(skeleton))],
        source=folder,
        against=f"config.json ({config.model_type})",
        skip=skip,
        aliases=key_map.aliases,
        mesh=mesh,
        rules=skeleton.partition_rules() if rules is None else rules,
        progress=progress,
        what=f"{folder} as {dtype.name}",
    )


# -- filling a skeleton -------------------------------------------------------------------
class Expected(NamedTuple):
    """What a load expects of one stored tensor, and the parameters it fills.

    - `tensor`: its stored name and its parameters (fused, transposed, stacked: see
      `eqxlm.params.CheckpointTensor`). Several parameters with no `fused` each receive the
      whole tensor (the one LoRA `A` of a projection eqxlm holds as parts);
    - `dtype`: the stored dtype it must have (a safetensors name: `"I8"`, `"U8"`, `"F32"`),
      or None: any float weight (`F64`, `F32`, `F16`, `BF16`), cast to the parameters' dtype;
    - `shape`: its stored shape, where that is not `tensor.shape` (int4 packed two per byte);
    - `convert`: stored values -> the parameters' values, on the whole tensor (int4 unpacking).
    """

    tensor: CheckpointTensor
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    convert: Callable[[np.ndarray], np.ndarray] | None = None


def _known(file_name: str, tensors: dict[str, Expected], aliases) -> str | None:
    if file_name in tensors:
        return file_name
    for pattern, replacement in aliases:
        alias = re.sub(pattern, replacement, file_name)
        if alias in tensors:
            return alias
    return None


def _check_covered(leaves: list, expected: Sequence[Expected]) -> None:
    """Every abstract leaf (every layer of a stacked one) is some expected tensor's part."""
    slots: dict[int, set] = {}
    for e in expected:
        for ref in e.tensor.parts:
            slots.setdefault(ref.leaf, set()).add(ref.index)
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            got = slots.get(i, set())
            stacked = len(next(iter(got))) if got else 0
            if not got or len(got) != math.prod(leaf.shape[:stacked]):
                raise ValueError(f"fill: leaf {i} {leaf.shape} of the skeleton is not filled by the expected tensors.")


def _problem(reader: st.SafetensorsFile, file_name: str, e: Expected, target: np.dtype) -> tuple[str | None, str | None]:
    """(misshapen, wrong dtype) lines for stored tensor `file_name`, expected as `e`, of a
    leaf of dtype `target`; None where it is right."""
    info, where = reader.entries[file_name], f"{reader.path.name}: {file_name}"
    shape = e.tensor.shape if e.shape is None else e.shape
    misshapen = None
    if info.shape != shape and e.dtype is None:
        misshapen = f"{where}: file {info.shape}, model {shape}"
    elif info.shape != shape:
        kinds = st.dtype_name(info.numpy_dtype), st.dtype_name(st.DTYPES[e.dtype][0])
        misshapen = f"{where}: file {kinds[0]} {info.shape}, model {kinds[1]} {shape}"
    if e.dtype is None:
        return misshapen, st.check_float(reader.path, file_name, info.dtype, target)
    return misshapen, None if info.dtype == e.dtype else f"{where}: stored as {info.dtype}, expected {e.dtype}"


def fill(
    skeleton,
    stored: dict[str, st.SafetensorsFile],
    expected: Sequence[Expected],
    *,
    source: str | os.PathLike,
    against: str,
    skip: Callable[[str], bool] | None = None,
    aliases: Sequence[tuple[str, str]] = (),
    mesh=None,
    rules=None,
    progress: bool | None = None,
    what: str | None = None,
):
    """Fill the abstract leaves of `skeleton` with stored tensors: the one loading path of
    [`from_pretrained`][], `eqxlm.load_quantized` and `eqxlm.lora.load_adapter`.

    **Arguments:**
    - `skeleton`: a model whose leaves to fill are `jax.ShapeDtypeStruct`s (built with
      `eqx.filter_eval_shape`); its concrete leaves are kept as they are.
    - `stored`: every stored tensor's name -> the open file that holds it.
    - `expected`: one [`Expected`][] per stored tensor the model needs; together they fill
      every abstract leaf.
    - `skip(name)`: stored tensors the model does not need that are not an error (recomputed
      buffers, a tied head saved anyway).
    - `aliases`: `(pattern, replacement)` pairs tried with `re.sub` on a stored name that
      matches nothing (other spellings of the same tensor).
    - `source`, `against`: the error reads `{source}: {files} does not match {against}`.
    - `mesh`, `rules`: place each leaf onto its shards of `mesh` as it is read, by `rules`.
    - `progress`: show a progress bar (default: for files over 256 MB).
    - `what`: how the memory check names the load (default: `source`).

    **Returns:** `skeleton` with every abstract leaf a `jax.Array` of its dtype.

    **Raises:** before anything is read, a `CheckpointError` naming, by file and tensor, every
    missing, unexpected and misshapen tensor and every stored dtype that cannot become its
    leaf's; then an `InsufficientMemoryError` when the leaves cannot fit.

    A plain tensor already in its leaf's dtype is used in place where it can be (on CPU, the
    file's mapped pages when 64-byte aligned); the others are read, cast and split a chunk at
    a time into their leaves, and a stacked leaf (scanned layers) is one buffer filled layer
    by layer, so memory holds the leaves plus one chunk, never a second copy.
    """
    leaves, treedef = jax.tree_util.tree_flatten(skeleton)
    _check_covered(leaves, expected)
    tensors = {e.tensor.name: e for e in expected}
    found: dict[str, str] = {}
    unexpected, misshapen, wrong_dtype = [], [], []
    for file_name, reader in stored.items():
        name = _known(file_name, tensors, aliases)
        if name is None:
            if not (skip and skip(file_name)):
                unexpected.append(f"{reader.path.name}: {file_name}")
            continue
        found[name] = file_name
        shape_problem, dtype_problem = _problem(
            reader, file_name, tensors[name], leaves[tensors[name].tensor.parts[0].leaf].dtype
        )
        misshapen += [shape_problem] if shape_problem else []
        wrong_dtype += [dtype_problem] if dtype_problem else []
    missing = sorted(set(tensors) - set(found))
    problems = []
    if missing:
        problems.append(f"missing tensors: {st._plural(missing, 12)}")
    if unexpected:
        problems.append(f"unexpected tensors: {st._plural(sorted(unexpected), 12)}")
    if misshapen:
        problems.append(f"misshapen tensors: {st._plural(sorted(misshapen), 8, '; ')}")
    if wrong_dtype:
        problems.append(f"wrong dtype: {st._plural(sorted(wrong_dtype), 8, '; ')}")
    readers = {reader.path: reader for reader in stored.values()}
    if problems:
        names = st._plural(sorted(path.name for path in readers), 3)
        raise CheckpointError(f"{source}: {names} does not match {against}:\n  " + "\n  ".join(problems))
    abstract = [leaf for leaf in leaves if isinstance(leaf, jax.ShapeDtypeStruct)]
    needed = sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in abstract)
    check_fits_in_memory(needed, what or str(source), devices=1 if mesh is None else mesh.size)

    values: list[Any] = list(leaves)
    specs = leaf_specs(skeleton, mesh, rules) if mesh is not None else {}
    stacked: dict[int, np.ndarray] = {}  # host buffers of stacked leaves, filled layer by layer
    total = sum(path.stat().st_size for path in readers)
    show = progress if progress is not None else total > 256 * 2**20
    bar = tqdm(total=len(found), desc=f"loading {Path(source).name}", unit="tensor", disable=not show)
    for name, e in tensors.items():
        file_name, tensor = found[name], e.tensor
        reader = stored[file_name]
        target = np.dtype(leaves[tensor.parts[0].leaf].dtype)
        outs = []
        for ref in tensor.parts:
            if ref.index:
                leaf = leaves[ref.leaf]
                if ref.leaf not in stacked:
                    stacked[ref.leaf] = st.aligned_empty(leaf.shape, leaf.dtype)
                outs.append(stacked[ref.leaf][(*ref.index, ...)])  # a view, even of a per-layer scalar
            else:
                outs.append(None)
        if e.convert is not None or (tensor.fused is None and len(tensor.parts) > 1):
            # whole: converted (one tensor's worth), or the same values for each part
            if e.convert is not None:
                array = e.convert(reader.read(file_name))
            else:
                array = reader.read(file_name, dtype=target, cast_into=_cast_into if _on_cpu() else None)
            pieces = tensor.split(array)
            pieces = pieces * len(tensor.parts) if len(pieces) == 1 else pieces
            for ref, out, piece in zip(tensor.parts, outs, pieces, strict=True):
                if out is not None:
                    out[...] = piece
                else:
                    values[ref.leaf] = _put(np.asarray(piece, target), mesh, specs.get(ref.leaf))
        elif tensor.fused is None and not tensor.transposed and not tensor.parts[0].index:
            values[tensor.parts[0].leaf] = _read(reader, file_name, target, mesh, specs.get(tensor.parts[0].leaf))
        else:
            outs = [
                st.aligned_empty(ref.shape, target) if out is None else out for ref, out in zip(tensor.parts, outs, strict=True)
            ]
            _split_into(reader, file_name, tensor, outs)
            for ref, out in zip(tensor.parts, outs, strict=True):
                if not ref.index:
                    values[ref.leaf] = _put(out, mesh, specs.get(ref.leaf))
        bar.update()
    for leaf, buffer in stacked.items():
        values[leaf] = _put(buffer, mesh, specs.get(leaf))
    bar.close()
    return jax.tree_util.tree_unflatten(treedef, values)


def _put(array: np.ndarray, mesh, spec) -> jax.Array:
    if mesh is None:
        return jax.device_put(array)
    return jax.device_put(array, jax.sharding.NamedSharding(mesh, spec))


#: Casts and splits go through scratch buffers of at most this many bytes; on an accelerator,
#: tensors larger than this are also placed in row chunks of about this size.
CHUNK_BYTES = 16 * 2**20


def _on_cpu() -> bool:
    """Whether `jax.device_put` without a device places on a CPU device."""
    device = jax.config.jax_default_device
    if device is None:
        return jax.devices()[0].platform == "cpu"
    return (device if isinstance(device, str) else device.platform) == "cpu"


#: float32 -> float16 on CPU is cast by XLA in pieces of at most this many elements, each a
#: power of two (at most a dozen shapes, so a dozen small compiles): numpy's cast is a scalar
#: loop, slower than XLA's (benchmarks/NOTES.md, Loading), and, unlike XLA and torch, does not
#: quiet a NaN's payload.
_PIECE = 2**20


@jax.jit
def _to_float16(x):
    return x.astype(jnp.float16)


def _cast_into(out: np.ndarray, values: np.ndarray) -> None:
    """`out[...] = values` (both flat and contiguous), float32 -> float16 through XLA."""
    if not (values.dtype == np.float32 and out.dtype == np.float16):
        out[...] = values
        return
    piece = None
    for pos in range(0, values.size, _PIECE):
        n = min(_PIECE, values.size - pos)
        src = values[pos : pos + n]
        size = max(256, 1 << (n - 1).bit_length())
        if n < size or src.ctypes.data % st.ALIGN:  # an aligned power-of-two piece is used in place
            if piece is None or piece.size != size:
                piece = st.aligned_empty((size,), np.float32)
            piece[:n] = src
            piece[n:] = 0
            src = piece
        out[pos : pos + n] = np.asarray(_to_float16(jax.device_put(src)))[:n]


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(buffer, rows, start):
    return jax.lax.dynamic_update_slice_in_dim(buffer, rows, start, axis=0)


def _place(reader: st.SafetensorsFile, name: str, target: np.dtype) -> jax.Array:
    """Read tensor `name` onto the default device, cast to `target`.

    On CPU: when the stored dtype is `target` and the tensor's bytes are 64-byte aligned in
    the file, the file's own pages (a read-only memory map) are handed to XLA, which uses
    them in place: nothing is copied or read until the weights are used, and each page is
    resident once, as file cache. Otherwise the tensor is read (cast in chunks) into one fresh
    64-byte aligned buffer, which XLA adopts without copying again.

    On an accelerator, a large tensor goes in row chunks into a donated device buffer, so host
    memory holds one chunk at a time, never the whole tensor."""
    info = reader.entries[name]
    shape, nbytes = info.shape, info.end - info.start
    if _on_cpu():
        if info.numpy_dtype == target and reader.aligned(name):
            return jax.device_put(reader.view(name))
        return jax.device_put(reader.read(name, dtype=target, chunk=CHUNK_BYTES, cast_into=_cast_into))
    if nbytes <= CHUNK_BYTES or len(shape) == 0 or shape[0] < 2:
        return jax.device_put(reader.read(name, dtype=target, chunk=CHUNK_BYTES))
    rows = max(1, CHUNK_BYTES // (nbytes // shape[0]))
    buffer = jnp.zeros(shape, target)
    for start in range(0, shape[0], rows):
        chunk = reader.read(name, slice(start, start + rows), dtype=target, chunk=CHUNK_BYTES)
        buffer = _write_rows(buffer, jax.device_put(chunk), start)
    return buffer


def _read(reader: st.SafetensorsFile, file_name: str, target: np.dtype, mesh, spec) -> jax.Array:
    """One plain tensor, cast to `target`; with a mesh, each device reads only its own slice."""
    if mesh is None:
        return _place(reader, file_name, target)
    shape = reader.entries[file_name].shape
    sharding = jax.sharding.NamedSharding(mesh, spec)
    cast_into = _cast_into if _on_cpu() else None
    return jax.make_array_from_callback(
        shape, sharding, lambda index: reader.read(file_name, index, dtype=target, chunk=CHUNK_BYTES, cast_into=cast_into)
    )


def _shaped(out: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A view of `out` with `shape` (setting `.shape` refuses where a copy would be needed,
    so writes through it always land in `out`)."""
    view = out.view()
    view.shape = shape
    return view


def _split_into(reader: st.SafetensorsFile, name: str, tensor: CheckpointTensor, outs: list[np.ndarray]) -> None:
    """Fill the parameter buffers `outs` (cast on assignment) from checkpoint tensor `name`,
    which the key map fuses and/or transposes (`tensor.split`), reading about `CHUNK_BYTES`
    of the file at a time: memory holds the parameters plus one chunk, never a second copy of
    the tensor. Chunks are whole rows of the file, and for per-head fused tensors whole heads."""
    shape = reader.entries[name].shape
    cpu = _on_cpu()
    transposed = tensor.transposed and len(shape) == 2
    fused = tensor.fused
    if len(shape) == 0 or (tensor.transposed and len(shape) > 2) or shape[0] == 0:
        for out, part in zip(outs, tensor.split(reader.read(name)), strict=True):
            out[...] = part.reshape(out.shape)
        return
    group = 1  # file rows that must be read together
    if fused is not None and fused.heads and not transposed:
        group = shape[0] // fused.heads
    row_bytes = reader.entries[name].numpy_dtype.itemsize * math.prod(shape[1:])
    step = max(1, CHUNK_BYTES // (row_bytes * group)) * group
    if fused is not None:
        sizes = [p.shape[0] for p in tensor.parts]
        bounds = np.cumsum([0, *sizes]).tolist()
    for r0 in range(0, shape[0], step):
        r1 = min(shape[0], r0 + step)
        rows = reader.read(name, slice(r0, r1), dtype=outs[0].dtype, chunk=CHUNK_BYTES, cast_into=_cast_into if cpu else None)
        if fused is None and transposed:  # file rows are parameter columns
            outs[0][:, r0:r1] = rows.T
        elif fused is None:  # a layer of a stacked parameter
            _shaped(outs[0], shape)[r0:r1] = rows
        elif transposed:
            columns = rows.T  # (fused rows, r1 - r0)
            for i, out in enumerate(outs):
                if fused.heads:
                    src = columns.reshape(fused.heads, len(outs), -1, r1 - r0)[:, i]
                    _shaped(out, (fused.heads, src.shape[1], out.shape[-1]))[:, :, r0:r1] = src
                else:
                    _shaped(out, (sizes[i], -1))[:, r0:r1] = columns[bounds[i] : bounds[i + 1]]
        elif fused.heads:
            grouped = rows.reshape((r1 - r0) // group, len(outs), -1, *shape[1:])
            h0, h1 = r0 // group, r1 // group
            for i, out in enumerate(outs):
                _shaped(out, (fused.heads, *grouped.shape[2:]))[h0:h1] = grouped[:, i]
        else:
            for i, out in enumerate(outs):
                lo, hi = max(r0, bounds[i]), min(r1, bounds[i + 1])
                if lo < hi:
                    _shaped(out, (sizes[i], *shape[1:]))[lo - bounds[i] : hi - bounds[i]] = rows[lo - r0 : hi - r0]


# -- saving -------------------------------------------------------------------------------
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, flags=re.I)
    if not match:
        raise ValueError(f"max_shard_size: cannot read {size!r} (e.g. '5GB', '500MB', 10_000_000).")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * scale)


def hf_state_dict(model: AbstractCausalLM) -> dict[str, np.ndarray]:
    """Every checkpoint tensor of `model` by its checkpoint key (the model's key map applied:
    fused projections joined, stacked layers split, transposed weights transposed)."""
    leaves = jax.tree_util.tree_leaves(model)
    out = {}
    for tensor in model.key_map().checkpoint_tensors(param_refs(model)):
        out[tensor.name] = tensor.join([np.asarray(leaves[ref.leaf][ref.index]) for ref in tensor.parts])
    return out


def _check_family(model: AbstractCausalLM, tensors: dict[str, np.ndarray]) -> None:
    """Refuse to write a folder that `from_pretrained` would refuse: the checkpoint tensors of
    `model` must be those its config's family builds (names and shapes; an abstract skeleton
    of the family, nothing allocated). A model whose parts were replaced (`eqx.tree_at`), one
    with LoRA adapters or quantized projections, differs."""
    model_type = model.config.model_type
    try:
        _, family = lookup(model_type)
    except KeyError:
        raise CheckpointError(
            f"save_pretrained: model_type {model_type!r} is not registered, so from_pretrained could not load the "
            "folder; register the config and model classes first (eqxlm.register(ConfigClass, ModelClass))."
        ) from None
    skeleton = eqx.filter_eval_shape(lambda key: family(model.config, key=key), jax.random.key(0))
    expected = {t.name: t.shape for t in skeleton.key_map().checkpoint_tensors(param_refs(skeleton))}
    extra = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    misshapen = sorted(
        f"{n}: model {tensors[n].shape}, {model_type} {expected[n]}"
        for n in set(tensors) & set(expected)
        if tensors[n].shape != expected[n]
    )
    if not (extra or missing or misshapen):
        return
    found = [f"not in a {model_type}: {st._plural(extra, 4)}"] if extra else []
    found += [f"missing: {st._plural(missing, 4)}"] if missing else []
    found += [f"misshapen: {st._plural(misshapen, 4, '; ')}"] if misshapen else []
    if any(re.search(r"\.lora_[AB]$", n) for n in extra):
        hint = "merge the adapters first (eqxlm.lora.merge_and_unload(model)), or save them alone with eqxlm.lora.save_adapter"
    elif any(n.endswith((".qweight", ".scales")) for n in extra):
        hint = "save a quantized model with eqxlm.save_quantized"
    else:
        hint = (
            "a model whose parts were changed is a new architecture: give it a config class with its own model_type "
            "and register it with its model class (eqxlm.register), as tests/test_user_model.py does"
        )
    raise CheckpointError(
        f"save_pretrained: the model's tensors are not those of its config's family ({model_type}), so "
        f"from_pretrained could not load the folder ({'; '.join(found)}); {hint}."
    )


def save_pretrained(model: AbstractCausalLM, out_dir: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> Path:
    """Write `model` as a Hugging Face checkpoint that transformers loads.

    Writes `config.json`, `generation_config.json` and `model.safetensors` (with
    `{"format": "pt"}` metadata), or shards `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json` when the weights exceed `max_shard_size` (bytes, or a
    string such as `"500MB"`). Tensors keep their dtype and values bit for bit.
    **Returns:** the folder.

    The tensors must be those the config's family builds (so that `from_pretrained` reads the
    folder back): a model with replaced parts, LoRA adapters or quantized projections is a
    `CheckpointError` that names the first differing tensors and says what to do instead.
    """
    tensors = dict(sorted(hf_state_dict(model).items()))
    _check_family(model, tensors)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    for stale in list(out.glob("model*.safetensors")) + [out / SAFE_INDEX]:
        stale.unlink(missing_ok=True)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        safetensors.numpy.save_file(shards[0], out / SAFE_SINGLE, metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            safetensors.numpy.save_file(shard, out / file, metadata=metadata)
            weight_map.update({name: file for name in shard})
        total = sum(a.nbytes for a in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    for written in out.glob("model*.safetensors"):  # safetensors writes 0600; follow the umask like open()
        written.chmod(0o666 & ~umask)
    config = model.config.to_hf()
    dtypes = {str(a.dtype) for a in tensors.values()}
    config["dtype"] = dtypes.pop() if len(dtypes) == 1 else config.get("dtype", "float32")
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = model.generation_config or GenerationConfig(
        model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id
    )
    (out / "generation_config.json").write_text(json.dumps(generation.to_hf(), indent=2, sort_keys=True) + "\n")
    return out


__all__ = ["CheckpointError", "CheckpointTensor", "from_pretrained", "hf_state_dict", "parameter_count", "save_pretrained"]
