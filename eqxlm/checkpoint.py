"""Hugging Face checkpoints in and out: `config.json` + safetensors, single or sharded.

Parameter names (`eqxlm.params`) are the builder's attribute paths
(`model.layers.0.self_attn.q_proj.weight`), which are Llama's checkpoint keys; each family's
key map (`model.key_map()`) says how its checkpoints differ (renamed modules, fused or
transposed projections, alternative spellings). Works for any model that implements
`eqxlm.models.AbstractCausalLM` and is registered.
"""

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from tqdm import tqdm

from .default import DEFAULT_MODEL, default_model_path
from .models import AbstractCausalLM, GenerationConfig, lookup, supported_model_types
from .params import CheckpointTensor, leaf_specs, param_refs, parameter_count

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
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
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names every bad tensor."""


def _dtype(dtype):
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}.")
        return _DTYPES[dtype]
    return jnp.dtype(dtype).type if not isinstance(dtype, type) else dtype


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
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (folder / f).exists()})
        if missing:
            raise CheckpointError(f"{folder}: shard(s) named in {SAFE_INDEX} are missing: {', '.join(missing)}.")
        return {name: folder / f for name, f in weight_map.items()}
    single = folder / SAFE_SINGLE
    if single.exists():
        with safetensors.safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
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
    raw = json.loads(path.read_text())
    model_type = raw.get("model_type")
    try:
        config_class, _ = lookup(model_type)
    except KeyError:
        raise CheckpointError(
            f"{path}: model_type {model_type!r} is not supported (supported: {', '.join(supported_model_types())})."
        ) from None
    return config_class.from_hf(raw)


def _load_generation_config(folder: Path, config) -> GenerationConfig:
    raw: dict[str, Any] = {}
    path = folder / "generation_config.json"
    if path.exists():
        raw = json.loads(path.read_text())
    eos = raw.get("eos_token_id", config.eos_token_id)
    eos = None if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),))
    return GenerationConfig(
        bos_token_id=raw.get("bos_token_id", config.bos_token_id),
        eos_token_id=eos,
        pad_token_id=raw.get("pad_token_id", config.pad_token_id),
    )


# -- loading ------------------------------------------------------------------------------
def _target_dtype(dtype, stored: set[str]):
    """The one dtype every weight ends in: the requested one, else the stored weights' (the
    widest float when they differ)."""
    if dtype is not None:
        return jnp.dtype(dtype)
    floats = [jnp.dtype(_SafetensorsHeader.DTYPES[d]) for d in stored if d in ("F64", "F32", "F16", "BF16")]
    if not floats:
        return jnp.dtype(jnp.float32)
    return max(floats, key=lambda d: (d.itemsize, d == jnp.dtype(jnp.float32)))


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
    - `dtype`: `jnp.float32`, `jnp.bfloat16`, `jnp.float16` (or their names); default
      the checkpoint's own dtype. Tensors are cast one at a time as they are read.
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
    headers = {file: _SafetensorsHeader(file) for file in set(files.values())}
    stored = {headers[file].entries[name]["dtype"] for name, file in files.items()}
    dtype = _target_dtype(_dtype(dtype), stored)
    extra = {"scan_layers": True} if scan_layers else {}
    skeleton = eqx.filter_eval_shape(
        lambda: model_cls(config, key=jax.random.key(0), dtype=dtype, generation_config=generation_config, **extra)
    )
    key_map = skeleton.key_map()
    tensors = {t.name: t for t in key_map.checkpoint_tensors(param_refs(skeleton))}
    ignored = re.compile(key_map.ignored) if key_map.ignored else None

    def known(file_name: str) -> str | None:
        if file_name in tensors:
            return file_name
        for pattern, replacement in key_map.aliases:
            alias = re.sub(pattern, replacement, file_name)
            if alias in tensors:
                return alias
        return None

    found: dict[str, tuple[str, Path]] = {}
    unexpected, misshapen = [], []
    tied = getattr(config, "tie_word_embeddings", False)
    for file_name, file in files.items():
        name = known(file_name)
        if name is not None:
            found[name] = (file_name, file)
            shape = tuple(headers[file].entries[file_name]["shape"])
            if shape != tensors[name].shape:
                misshapen.append(f"{file_name}: file {shape}, model {tensors[name].shape}")
        elif (ignored and ignored.search(file_name)) or (tied and file_name.endswith("lm_head.weight")):
            continue  # a recomputed buffer, or a tied head saved anyway (it equals the embedding)
        else:
            unexpected.append(file_name)
    missing = sorted(set(tensors) - set(found))
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(sorted(unexpected))}")
    if misshapen:
        problems.append(f"misshapen tensors: {'; '.join(sorted(misshapen))}")
    if problems:
        raise CheckpointError(f"{folder} does not match its config.json ({config.model_type}):\n  " + "\n  ".join(problems))

    leaves, treedef = jax.tree_util.tree_flatten(skeleton)
    values: list[Any] = list(leaves)
    rules = skeleton.partition_rules() if rules is None else rules
    specs = leaf_specs(skeleton, mesh, rules) if mesh is not None else {}
    stacked: dict[int, np.ndarray] = {}  # host buffers of stacked leaves, filled layer by layer
    total = sum(f.stat().st_size for f in headers)
    show = progress if progress is not None else total > 256 * 2**20
    bar = tqdm(total=len(found), desc=f"loading {folder.name}", unit="tensor", disable=not show)
    cast = lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != dtype else a  # noqa: E731
    for name, tensor in tensors.items():
        file_name, file = found[name]
        simple = tensor.fused is None and not tensor.transposed and not tensor.parts[0].index
        if simple:
            ref = tensor.parts[0]
            values[ref.leaf] = _read(headers[file], file, file_name, tensor.shape, cast, mesh, specs.get(ref.leaf))
        else:
            for ref, part in zip(tensor.parts, tensor.split(headers[file].read(file_name)), strict=True):
                if ref.index:
                    leaf = leaves[ref.leaf]
                    buffer = stacked.get(ref.leaf)
                    if buffer is None:
                        buffer = stacked[ref.leaf] = np.empty(leaf.shape, leaf.dtype)
                    buffer[ref.index] = cast(part)
                else:
                    values[ref.leaf] = _put(cast(part), mesh, specs.get(ref.leaf))
        bar.update()
    for leaf, buffer in stacked.items():
        values[leaf] = _put(buffer, mesh, specs.get(leaf))
    bar.close()
    return jax.tree_util.tree_unflatten(treedef, values)


def _put(array: np.ndarray, mesh, spec) -> jax.Array:
    if mesh is None:
        return jax.device_put(array)
    return jax.device_put(array, jax.sharding.NamedSharding(mesh, spec))


class _SafetensorsHeader:
    """Offsets of a safetensors file's tensors, from its header (an 8-byte little-endian
    length, then JSON), so that a tensor can be read with one `readinto` into its own numpy
    buffer. Going through `safe_open`'s memory map instead leaves every page read resident
    until the file is closed: a second copy of the weights at the end of a load."""

    DTYPES = {
        "F64": np.float64,
        "F32": np.float32,
        "F16": np.float16,
        "BF16": jnp.bfloat16,
        "I64": np.int64,
        "I32": np.int32,
        "I16": np.int16,
        "I8": np.int8,
        "U8": np.uint8,
        "BOOL": np.bool_,
    }

    def __init__(self, file: Path):
        self.file = file
        with open(file, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            self.entries = json.loads(fh.read(size))
        self.data_start = 8 + size

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Tensor `name` (or a range of its leading-axis rows) in a fresh numpy buffer."""
        entry = self.entries[name]
        start, end = entry["data_offsets"]
        shape = list(entry["shape"])
        if rows is not None:
            row_bytes = (end - start) // max(shape[0], 1)
            first, stop, _ = rows.indices(shape[0])
            start, end = start + first * row_bytes, start + stop * row_bytes
            shape[0] = stop - first
        array = np.empty(shape, dtype=self.DTYPES[entry["dtype"]])
        with open(self.file, "rb") as fh:
            fh.seek(self.data_start + start)
            if fh.readinto(memoryview(array.reshape(-1)).cast("B")) != end - start:
                raise CheckpointError(f"{self.file}: {name} is truncated.")
        return array


#: Tensors larger than this are read and placed in row chunks of about this size.
CHUNK_BYTES = 256 * 2**20


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(buffer, rows, start):
    return jax.lax.dynamic_update_slice_in_dim(buffer, rows, start, axis=0)


def _place(header: _SafetensorsHeader, name: str, cast) -> jax.Array:
    """Read tensor `name` onto the default device. A large tensor goes in row chunks into a
    donated buffer, so memory peaks at the weights plus one chunk, never two copies of it."""
    entry = header.entries[name]
    shape, nbytes = entry["shape"], entry["data_offsets"][1] - entry["data_offsets"][0]
    if nbytes <= CHUNK_BYTES or len(shape) == 0 or shape[0] < 2:
        return jax.device_put(cast(header.read(name)))
    rows = max(1, CHUNK_BYTES // (nbytes // shape[0]))
    first = cast(header.read(name, slice(0, rows)))
    buffer = jnp.zeros(shape, first.dtype)
    for start in range(0, shape[0], rows):
        chunk = first if start == 0 else cast(header.read(name, slice(start, start + rows)))
        buffer = _write_rows(buffer, jax.device_put(chunk), start)
    return buffer


def _read(header, file: Path, file_name: str, shape, cast, mesh, spec) -> jax.Array:
    """One plain tensor, cast; with a mesh, each device reads only its own slice."""
    if mesh is None:
        return _place(header, file_name, cast)
    sharding = jax.sharding.NamedSharding(mesh, spec)
    with safetensors.safe_open(file, framework="numpy") as f:
        tensor = f.get_slice(file_name)
        return jax.make_array_from_callback(tuple(shape), sharding, lambda index: cast(tensor[index]))


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


def save_pretrained(model: AbstractCausalLM, out_dir: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> Path:
    """Write `model` as a Hugging Face checkpoint that transformers loads.

    Writes `config.json`, `generation_config.json` and `model.safetensors` (with
    `{"format": "pt"}` metadata), or shards `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json` when the weights exceed `max_shard_size` (bytes, or a
    string such as `"500MB"`). Tensors keep their dtype and values bit for bit.
    **Returns:** the folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = dict(sorted(hf_state_dict(model).items()))
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
