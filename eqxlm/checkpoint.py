"""Hugging Face checkpoints in and out: `config.json` + safetensors, single or sharded.

Parameter names are the model's attribute paths (`model.layers.0.self_attn.q_proj.weight`),
which eqxlm chose to equal the Hugging Face keys, so the key map is the identity (BLOOM
files saved from `BloomModel` lack the `transformer.` prefix: both are accepted).
"""

import functools
import json
import math
import os
import re
from pathlib import Path
from typing import Any

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
from .models import ARCHITECTURES, CausalLM, ConfigError, GenerationConfig
from .models._config import check_field_types

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
#: Files fetched from the hub: configs, safetensors, and the tokenizer for the CLI.
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    SAFE_INDEX,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
#: Tensors some checkpoints carry that eqxlm recomputes (rotary tables) and skips.
SKIPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|(^|\.)attn\.masked_bias$|(^|\.)attn\.bias$")


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
    """Read `config.json` into the right architecture's frozen config."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder}: no config.json.")
    raw = st.read_json(path, "config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object of config fields, found {type(raw).__name__}.")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: model_type {model_type!r:.40} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})."
        )
    try:
        return ARCHITECTURES[model_type][0].from_hf(raw)
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


# -- names <-> leaves ---------------------------------------------------------------------
def _path_name(path) -> str:
    parts = []
    for p in path:
        if isinstance(p, jax.tree_util.GetAttrKey):
            parts.append(p.name)
        elif isinstance(p, jax.tree_util.SequenceKey):
            parts.append(str(p.idx))
        else:
            raise TypeError(f"unexpected pytree key {p!r} in a model")
    return ".".join(parts)


def _is_param(x) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def state_dict(model: CausalLM) -> dict[str, jax.Array]:
    """Every parameter by its Hugging Face name (abstract `ShapeDtypeStruct`s too, for a
    model from `eqx.filter_eval_shape`)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(eqx.filter(model, _is_param))
    return {_path_name(path): leaf for path, leaf in leaves}


def _checkpoint_name(name: str, model_type: str, expected: set[str]) -> str:
    """Map a file's tensor name onto the model's (BLOOM's optional `transformer.` prefix)."""
    if model_type == "bloom" and name not in expected and f"transformer.{name}" in expected:
        return f"transformer.{name}"
    return name


# -- loading ------------------------------------------------------------------------------
def from_pretrained(
    path_or_repo_id: str | os.PathLike,
    *,
    dtype=None,
    revision: str | None = None,
    progress: bool | None = None,
    mesh=None,
    rules=None,
) -> CausalLM:
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
      as it is read, under `rules` (default `eqxlm.sharding.DEFAULT_RULES`): each device's
      slice is read from the file on its own, so no device or host holds a whole tensor it
      does not own.

    **Returns:** a `BloomForCausalLM`, `MistralForCausalLM` or `LlamaForCausalLM`.

    The model skeleton is built with `eqx.filter_eval_shape` (no random weights are
    allocated) and filled tensor by tensor, so peak memory stays near one copy of the
    weights. Missing, unexpected and misshapen tensors are all reported, by name, in one
    `CheckpointError`.
    """
    folder = resolve(path_or_repo_id, revision=revision)
    config = load_config(folder)
    generation_config = _load_generation_config(folder, config)
    files = _tensor_files(folder)
    model_cls = ARCHITECTURES[config.model_type][1]
    skeleton = eqx.filter_eval_shape(lambda: model_cls(config, key=jax.random.key(0), generation_config=generation_config))

    leaves, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
    index_of = {_path_name(path): i for i, (path, leaf) in enumerate(leaves) if isinstance(leaf, jax.ShapeDtypeStruct)}
    expected = set(index_of)
    readers = {file: st.SafetensorsFile(file) for file in sorted(set(files.values()))}
    if (folder / SAFE_INDEX).exists():
        st.check_index(folder / SAFE_INDEX, files, readers)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    unexpected, tied_extra = [], []
    for file_name, file in files.items():
        name = _checkpoint_name(file_name, config.model_type, expected)
        if name in expected:
            by_file.setdefault(file, []).append((file_name, name))
        elif name == "lm_head.weight" and config.tie_word_embeddings:
            tied_extra.append(name)  # a tied head saved anyway: it equals the embedding
        elif not SKIPPED.search(name):
            unexpected.append(f"{file.name}: {file_name}")
    present = {name for pairs in by_file.values() for _, name in pairs}
    missing = sorted(expected - present)
    stored = {readers[file].entries[file_name].dtype for file, pairs in by_file.items() for file_name, _ in pairs}
    target = st.target_dtype(dtype, st.read_json(folder / "config.json", "config"), stored, folder / "config.json")

    values: list[Any] = [leaf for _, leaf in leaves]
    misshapen, wrong_dtype = [], []
    for file, pairs in by_file.items():
        for file_name, name in pairs:
            want, info = leaves[index_of[name]][1], readers[file].entries[file_name]
            if info.shape != tuple(want.shape):
                misshapen.append(f"{file.name}: {file_name}: file {info.shape}, model {tuple(want.shape)}")
            problem = st.check_float(file, file_name, info.dtype, target)
            if problem:
                wrong_dtype.append(problem)
    problems = []
    if missing:
        problems.append(f"missing tensors: {st._plural(missing, 12)}")
    if unexpected:
        problems.append(f"unexpected tensors: {st._plural(sorted(unexpected), 12)}")
    if misshapen:
        problems.append(f"misshapen tensors: {st._plural(sorted(misshapen), 8, '; ')}")
    if wrong_dtype:
        problems.append(f"wrong dtype: {st._plural(sorted(wrong_dtype), 8, '; ')}")
    if problems:
        names = st._plural(sorted(f.name for f in readers), 3)
        raise CheckpointError(f"{folder}: {names} does not match config.json ({config.model_type}):\n  " + "\n  ".join(problems))
    needed = sum(math.prod(leaves[index_of[name]][1].shape) for name in present) * target.itemsize
    check_fits_in_memory(needed, f"{folder} as {target.name}", devices=1 if mesh is None else mesh.size)

    total = sum(f.stat().st_size for f in readers)
    show = progress if progress is not None else total > 256 * 2**20
    bar = tqdm(total=len(present), desc=f"loading {folder.name}", unit="tensor", disable=not show)
    for file, pairs in by_file.items():
        for file_name, name in pairs:
            values[index_of[name]] = _read(readers[file], file_name, target, mesh, rules, name)
            bar.update()
    bar.close()
    return jax.tree_util.tree_unflatten(treedef, values)


#: Tensors larger than this are read and placed in row chunks of about this size.
CHUNK_BYTES = 256 * 2**20


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(buffer, rows, start):
    return jax.lax.dynamic_update_slice_in_dim(buffer, rows, start, axis=0)


def _place(reader: st.SafetensorsFile, name: str, target: np.dtype) -> jax.Array:
    """Read tensor `name` onto the default device, cast to `target`. A large tensor goes in
    row chunks into a donated buffer, so memory peaks at the weights plus one chunk, never
    two copies of it. Each read lands in its own fresh numpy buffer (no memory map stays
    resident: going through `safe_open`'s map left every page read resident until the file
    closed, a second copy of the weights at the end of a load)."""
    info = reader.entries[name]
    shape, nbytes = info.shape, info.end - info.start
    if nbytes <= CHUNK_BYTES or len(shape) == 0 or shape[0] < 2:
        return jax.device_put(st.cast(reader.read(name), target))
    rows = max(1, CHUNK_BYTES // (nbytes // shape[0]))
    first = st.cast(reader.read(name, slice(0, rows)), target)
    buffer = jnp.zeros(shape, first.dtype)
    for start in range(0, shape[0], rows):
        chunk = first if start == 0 else st.cast(reader.read(name, slice(start, start + rows)), target)
        buffer = _write_rows(buffer, jax.device_put(chunk), start)
    return buffer


def _read(reader: st.SafetensorsFile, file_name: str, target: np.dtype, mesh, rules, name: str) -> jax.Array:
    """One tensor, cast to `target`; with a mesh, each device reads only its own slice."""
    if mesh is None:
        return _place(reader, file_name, target)
    from .sharding import DEFAULT_RULES, _spec

    shape = reader.entries[file_name].shape
    sharding = jax.sharding.NamedSharding(mesh, _spec(name, shape, mesh, rules or DEFAULT_RULES))
    return jax.make_array_from_callback(shape, sharding, lambda index: st.cast(reader.read(file_name, index), target))


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


def save_pretrained(model: CausalLM, out_dir: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> Path:
    """Write `model` as a Hugging Face checkpoint that transformers loads.

    Writes `config.json`, `generation_config.json` and `model.safetensors` (with
    `{"format": "pt"}` metadata), or shards `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json` when the weights exceed `max_shard_size` (bytes, or a
    string such as `"500MB"`). Tensors keep their dtype and values bit for bit.
    **Returns:** the folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: np.asarray(value) for name, value in sorted(state_dict(model).items())}
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


def parameter_count(model) -> int:
    """The number of parameters (array elements) in `model`."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
