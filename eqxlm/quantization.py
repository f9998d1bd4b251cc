"""Weight-only int8 / int4 quantization, an opt-in transformation of any model.

    qmodel = eqxlm.quantize(model, bits=8)                   # int8, one scale per output channel
    qmodel = eqxlm.quantize(model, bits=4, group_size=128)   # int4, one scale per 128 inputs
    eqxlm.save_quantized(qmodel, "out/")                     # config.json + quantized.safetensors + quantization.json
    qmodel = eqxlm.load_quantized("out/")

`quantize` replaces the selected `eqx.nn.Linear` layers by [`QuantizedLinear`][]s (tree
surgery with `eqx.tree_at`; the input model is unchanged). A `QuantizedLinear` holds the
weight as int8 `(out, in)` and float scales `(out, in // group_size)`, symmetric absmax:

$$s_{o,g} = \\max_{i \\in g} |W_{o,i}| / q_{max}, \\quad Q_{o,i} = \\mathrm{round}(W_{o,i} / s_{o,g(i)}) \\in [-q_{max}, q_{max}],
\\quad y_o = \\sum_g s_{o,g} \\sum_{i \\in g} Q_{o,i} x_i + b_o$$

with $q_{max} = 127$ (int8: one group, `group_size = in_features`) or $7$ (int4: groups of
`group_size` along `in`). int4 values are held **unpacked, one per int8** in memory
(on XLA:CPU an in-graph unpack of packed nibbles, or `jnp.int4` storage, read slower than
int8: see benchmarks/NOTES.md, "Quantization"), and **packed two per byte** in the saved file.

**What is quantized.** By default every `eqx.nn.Linear` whose name's last part is not
`lm_head`, `gate` (a mixture-of-experts router) or `shared_expert_gate`: the attention and
MLP projections of the decoder layers, and the stacked experts of `eqxlm.nn.SparseMoE`.
Embeddings (`eqx.nn.Embedding`, a lookup, not a matrix product) are never quantized; a tied
head reads the embedding and stays float. The untied head and the routers stay float by
default because they are where an error changes the output most directly (the next-token
argmax; which experts run) for a small share of the weights; pass
`where=lambda name: True` to quantize the head too (measured in benchmarks/NOTES.md).
`where` receives the eqxlm parameter name of each linear layer without `.weight`
(`model.layers.3.mlp.up_proj`; stacked layers and experts once per layer / expert, and they
must all agree). Subclasses of `eqx.nn.Linear` (LoRA adapters) are left alone: merge them
first (`eqxlm.lora.merge`).

**Running.** `QuantizedLinear` takes one token, as `eqx.nn.Linear` does, and works unrolled,
in scanned layers (`eqxlm.scan_layers`), under `jax.vmap` and in `eqxlm.generate`. One token
(decode) is a 2-D multiply-reduce over the int8 weight, which XLA:CPU compiles into one YNNPACK
fusion that reads the int8 weight itself (no float copy of it), yet at well under the float32
dot's speed: at the 0.5B shape batch-1 decode is faster than scanned float32 but slower than
the default unrolled float32 model (figures in benchmarks/NOTES.md, "Quantization"): int8
saves memory, not time. Under `jax.vmap` over more than `SMALL_BATCH` tokens in all
(prefill), the layer dequantizes the weight once and does one matrix product, which is what a
float layer costs plus the dequantization. The choice is made
by a `jax.custom_batching.custom_vmap` rule, so quantized models are for inference: no
reverse-mode differentiation through a `QuantizedLinear`. `eqxlm.nn.SparseMoE` reads its
experts' weights as arrays (`.weight`), which a `QuantizedLinear` gives dequantized.

**Qwix.** Google's Qwix 0.1.8 was considered first and not used: its model-level API
(`qwix.quantize_model` with rules) intercepts the operations of **Flax** modules (linen /
nnx), so it does nothing for Equinox modules, and depending on it would pull flax 0.12.8 and
orbax into eqxlm for what is here ~100 lines of absmax arithmetic and one module. Its
quantized-array helpers do the same symmetric absmax rounding as this file.
"""

import json
import os
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int8

from . import _safetensors as st
from ._typing import typecheck
from .params import CheckpointTensor, param_refs

BITS = (8, 4)
#: Up to this many tokens in all under `jax.vmap`, each token is a fused multiply-reduce
#: over the int8 weight; above, the weight is dequantized once for one matrix product.
SMALL_BATCH = 4
#: Default-excluded linear layers, by the last part of their name (see the module docstring).
DEFAULT_SKIP = ("lm_head", "gate", "shared_expert_gate")
QUANTIZED_FILE = "quantized.safetensors"
QUANTIZATION_JSON = "quantization.json"
FORMAT = "eqxlm-weight-only/1"


def default_where(name: str) -> bool:
    """The default selection: every linear layer except the head and MoE routers."""
    return name.rsplit(".", 1)[-1] not in DEFAULT_SKIP


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _check_bits(bits, group_size, in_features: int | None = None, where: str = "quantize") -> None:
    if bits not in BITS:
        raise ValueError(f"{where}: bits must be 8 or 4, got {bits!r}.")
    if bits == 8 and group_size is not None:
        raise ValueError(f"{where}: group_size is for bits=4 (int8 has one scale per output channel), got {group_size!r}.")
    if bits == 4 and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"{where}: group_size must be a positive int for bits=4, got {group_size!r}.")
    if in_features is not None and bits == 4 and in_features % group_size:
        raise ValueError(f"{where}: in_features {in_features} is not a multiple of group_size {group_size}.")


# -- the arithmetic ----------------------------------------------------------------------
def _dequantize(qweight, scales):
    """`(..., out, in)` float weights from int8 values and `(..., out, groups)` scales."""
    *lead, out, n_in = qweight.shape
    groups = scales.shape[-1]
    q = qweight.reshape(*lead, out, groups, n_in // groups).astype(scales.dtype)
    return (q * scales[..., None]).reshape(*lead, out, n_in)


def _matvec(qweight, scales, x):
    """One token: `sum_g s[o, g] sum_{i in g} Q[o, i] x[i]`, a multiply-reduce over the int8
    weight in its `(out, in)` layout. The product is formed 2-D and reduced along `in` (one
    group) or reshaped to `(out, groups, group_size)` after the product (int4): a 3-D view of
    the int8 weight before the product misses XLA:CPU's YNNPACK rewrite inside a scanned layer
    and runs in XLA's own, much slower loop (NOTES.md)."""
    out, n_in = qweight.shape
    groups = scales.shape[-1]
    dtype = jnp.promote_types(scales.dtype, jnp.float32)
    product = qweight.astype(dtype) * x.astype(dtype)[None, :]
    if groups == 1:
        return jnp.sum(product, axis=1) * scales[:, 0].astype(dtype)
    partial = jnp.sum(product.reshape(out, groups, n_in // groups), axis=-1)
    return jnp.sum(partial * scales.astype(dtype), axis=-1)


def _matmat(qweight, scales, x):
    """Rows `x` `(n, in)`: per-row fused reduces for a few rows, else dequantize once."""
    if x.shape[0] <= SMALL_BATCH:  # one 2-D reduce per row (vmapped, the reduce is 3-D: the slow loop above)
        return jnp.stack([_matvec(qweight, scales, row) for row in x])
    dtype = jnp.promote_types(scales.dtype, jnp.float32)
    return x.astype(dtype) @ _dequantize(qweight, scales).astype(dtype).T


@jax.custom_batching.custom_vmap
def _rows(qweight, scales, x):
    return _matmat(qweight, scales, x)


@_rows.def_vmap
def _rows_rule(axis_size, in_batched, qweight, scales, x):
    if in_batched[0] or in_batched[1]:  # weights differ per row: nothing to share
        axes = tuple(0 if b else None for b in in_batched)
        return jax.vmap(_matmat, in_axes=axes)(qweight, scales, x), True
    if not in_batched[2]:
        x = jnp.broadcast_to(x, (axis_size, *x.shape))
    n = x.shape[1]
    return _rows(qweight, scales, x.reshape(axis_size * n, -1)).reshape(axis_size, n, -1), True


@jax.custom_batching.custom_vmap
def _token(qweight, scales, x):
    return _matvec(qweight, scales, x)


@_token.def_vmap
def _token_rule(axis_size, in_batched, qweight, scales, x):
    if in_batched[0] or in_batched[1]:
        axes = tuple(0 if b else None for b in in_batched)
        return jax.vmap(_matvec, in_axes=axes)(qweight, scales, x), True
    if not in_batched[2]:
        x = jnp.broadcast_to(x, (axis_size, *x.shape))
    return _rows(qweight, scales, x), True


# -- the module --------------------------------------------------------------------------
class QuantizedLinear(eqx.Module):
    """A linear layer with int8 (or int4-valued int8) weights and float scales.

    `qweight` `(out_features, in_features)` int8; `scales` `(out_features, groups)` in the
    layer's float dtype, `groups = in_features // group_size` (1 for int8); `bias` float or
    None. Computes `W x + b` with `W = dequantize()`, one token at a time (`jax.vmap` for a
    sequence), returning the float dtype of the scales (the original layer's dtype).
    """

    qweight: Int8[Array, "out_features in_features"]
    scales: Float[Array, "out_features groups"]
    bias: Float[Array, " out_features"] | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    bits: int = eqx.field(static=True)
    group_size: int = eqx.field(static=True)

    @classmethod
    def from_linear(cls, linear: eqx.nn.Linear, bits: int = 8, group_size: int | None = None) -> "QuantizedLinear":
        """Quantize `linear` (symmetric absmax; see the module docstring). Its weight may
        carry leading stacked axes (scanned layers, experts): each slice gets its own scales."""
        if isinstance(linear.in_features, str) or isinstance(linear.out_features, str):
            raise ValueError("QuantizedLinear: a 'scalar' eqx.nn.Linear has nothing to quantize.")
        _check_bits(bits, group_size, linear.in_features, "QuantizedLinear")
        size = linear.in_features if bits == 8 else group_size
        w = linear.weight
        *lead, out, n_in = w.shape
        grouped = w.astype(jnp.float32).reshape(*lead, out, n_in // size, size)
        absmax = jnp.max(jnp.abs(grouped), axis=-1)
        scales = jnp.where(absmax > 0, absmax / _qmax(bits), 1.0)
        q = jnp.clip(jnp.round(grouped / scales[..., None]), -_qmax(bits), _qmax(bits))
        return cls(
            q.astype(jnp.int8).reshape(w.shape),
            scales.astype(w.dtype),
            linear.bias,
            in_features=linear.in_features,
            out_features=linear.out_features,
            use_bias=linear.use_bias,
            bits=bits,
            group_size=size,
        )

    def __init__(self, qweight, scales, bias, *, in_features, out_features, use_bias, bits, group_size):
        """Usually built by [`from_linear`][] or [`quantize`][]."""
        self.qweight, self.scales, self.bias = qweight, scales, bias
        self.in_features, self.out_features, self.use_bias = in_features, out_features, use_bias
        self.bits, self.group_size = bits, group_size

    def __check_init__(self):
        _check_bits(self.bits, None if self.bits == 8 else self.group_size, self.in_features, "QuantizedLinear")

    def dequantize(self) -> Array:
        """The float weight `(..., out, in)` this layer computes with."""
        return _dequantize(self.qweight, self.scales)

    @property
    def weight(self) -> Array:
        """The dequantized weight, for code that reads a linear layer's `.weight` directly
        (`eqxlm.nn.SparseMoE`'s experts)."""
        return self.dequantize()

    @typecheck
    def __call__(self, x: Float[Array, " in_features"], *, key=None) -> Float[Array, " out_features"]:
        """**Arguments:** `x`, one token; `key` ignored (as `eqx.nn.Linear`'s)."""
        y = _token(self.qweight, self.scales, x)
        if self.bias is not None:
            y = y + self.bias.astype(y.dtype)
        return y.astype(self.scales.dtype)


# -- the transformation ------------------------------------------------------------------
def _linear_nodes(model) -> list[tuple[tuple, eqx.nn.Linear, list[str]]]:
    """Every plain `eqx.nn.Linear` of `model` with its pytree path and its parameter names
    (one per layer / expert where stacked)."""
    names: dict[int, list[str]] = {}
    leaves = jax.tree_util.tree_leaves(model)
    for ref in param_refs(model):
        names.setdefault(id(leaves[ref.leaf]), []).append(ref.name)
    is_linear = lambda x: type(x) is eqx.nn.Linear  # noqa: E731
    found = []
    for path, node in jax.tree_util.tree_flatten_with_path(model, is_leaf=is_linear)[0]:
        if is_linear(node):
            found.append((path, node, [n.removesuffix(".weight") for n in names.get(id(node.weight), [])]))
    return found


def _follow(tree, path):
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            tree = getattr(tree, key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            tree = tree[key.idx]
        elif isinstance(key, jax.tree_util.DictKey):
            tree = tree[key.key]
        else:
            raise TypeError(f"quantize: unexpected pytree key {key!r}")
    return tree


def quantize(model, bits: int = 8, group_size: int | None = None, *, where: Callable[[str], bool] | None = None):
    """A copy of `model` whose selected linear layers are [`QuantizedLinear`][]s.

    **Arguments:** `model` (any module; an `eqxlm.AbstractCausalLM` in particular); `bits`
    (8 or 4); `group_size` (int4 only, default 128; must divide each selected layer's
    `in_features`); `where` (a predicate over linear-layer names, default [`default_where`][]:
    all but the head and MoE routers). **Returns:** the quantized model.
    """
    if bits == 4 and group_size is None:
        group_size = 128
    _check_bits(bits, group_size)
    where = default_where if where is None else where
    chosen = []
    for path, node, names in _linear_nodes(model):
        votes = {bool(where(n)) for n in names} if names else {bool(where(jax.tree_util.keystr(path)))}
        if len(votes) > 1:
            raise ValueError(
                f"quantize: `where` selects some but not all of the stacked layers {names[0]} ... {names[-1]}; "
                "quantize before `eqxlm.scan_layers` (or select all of them)."
            )
        if votes.pop():
            chosen.append((path, node, names))
    if not chosen:
        raise ValueError("quantize: `where` selects no linear layer.")
    bad = [n[0] for _, node, n in chosen if bits == 4 and node.in_features % group_size]
    if bad:
        raise ValueError(f"quantize: group_size {group_size} does not divide in_features of {', '.join(bad[:4])}.")
    new = [QuantizedLinear.from_linear(node, bits, group_size) for _, node, _ in chosen]
    return eqx.tree_at(lambda m: [_follow(m, p) for p, _, _ in chosen], model, new)


def quantized_layers(model) -> dict[str, QuantizedLinear]:
    """Every `QuantizedLinear` of `model` by name (stacked: the first layer's name)."""
    names: dict[int, list[str]] = {}
    leaves = jax.tree_util.tree_leaves(model)
    for ref in param_refs(model):
        names.setdefault(id(leaves[ref.leaf]), []).append(ref.name)
    is_q = lambda x: isinstance(x, QuantizedLinear)  # noqa: E731
    out = {}
    for _, node in jax.tree_util.tree_flatten_with_path(model, is_leaf=is_q)[0]:
        if is_q(node):
            for name in names.get(id(node.qweight), []):
                out[name.removesuffix(".qweight")] = node
    return out


# -- save / load -------------------------------------------------------------------------
def _pack4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], even last axis -> uint8, two per byte (low nibble first)."""
    u = (q.astype(np.int16) & 0xF).astype(np.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def _unpack4(p: np.ndarray) -> np.ndarray:
    low, high = (p & 0xF).astype(np.int8), (p >> 4).astype(np.int8)
    out = np.stack([low, high], axis=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    return np.where(out > 7, out - 16, out).astype(np.int8)


def save_quantized(model, out_dir: str | os.PathLike) -> Path:
    """Write a quantized `eqxlm.AbstractCausalLM` to `out_dir`: `config.json` and
    `generation_config.json` (the float model's, as `save_pretrained` writes them),
    `quantization.json` (format, bits, group size, float dtype, the quantized layers' names)
    and `quantized.safetensors` (every parameter by its eqxlm name; int4 values packed two
    per byte as U8). Stacked layers are saved per layer, so a scanned model loads unscanned
    and back. **Returns:** the folder."""
    from safetensors.numpy import save_file

    layers = quantized_layers(model)
    if not layers:
        raise ValueError("save_quantized: the model has no QuantizedLinear (use eqxlm.quantize first, or save_pretrained).")
    kinds = {(q.bits, q.group_size if q.bits == 4 else None) for q in layers.values()}
    if len(kinds) > 1:
        mixed = sorted(kinds, key=str)
        raise ValueError(f"save_quantized: the layers mix quantizations {mixed}; one (bits, group_size) per model.")
    bits, group_size = kinds.pop()
    leaves = jax.tree_util.tree_leaves(model)
    tensors = {}
    for ref in param_refs(model):
        array = np.asarray(leaves[ref.leaf][ref.index])
        if bits == 4 and ref.name.endswith(".qweight"):
            array = _pack4(array)
        tensors[ref.name] = array
    floats = {str(a.dtype) for n, a in tensors.items() if not n.endswith(".qweight") and np.issubdtype(a.dtype, np.floating)}
    floats |= {str(a.dtype) for n, a in tensors.items() if a.dtype.name == "bfloat16"}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "bits": bits,
        "group_size": group_size,
        "dtype": floats.pop() if len(floats) == 1 else "float32",
        "model_type": model.config.model_type,
        "modules": sorted(layers),
    }
    save_file(dict(sorted(tensors.items())), out / QUANTIZED_FILE, metadata={"format": FORMAT})
    (out / QUANTIZATION_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    config = model.config.to_hf()
    config["dtype"] = meta["dtype"]
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = model.generation_config
    if generation is not None:
        (out / "generation_config.json").write_text(json.dumps(generation.to_hf(), indent=2, sort_keys=True) + "\n")
    return out


def _selected(modules: list[str]) -> Callable[[str], bool]:
    chosen = set(modules)
    return lambda name: name in chosen


def load_quantized(path: str | os.PathLike, *, scan_layers: bool = False):
    """Load what [`save_quantized`][] wrote. **Raises** `eqxlm.CheckpointError` naming the
    file and the culprit when `quantization.json` is missing or not this format, when its
    model type differs from `config.json`'s, or when `quantized.safetensors` does not match
    the model the config and the quantization describe (missing, unexpected, misshapen or
    wrong-dtype tensors), as `from_pretrained` fills its skeleton (`eqxlm.checkpoint.fill`):
    float tensors read in place where they can be, stacked layers filled layer by layer."""
    from .checkpoint import Expected, _load_generation_config, fill, load_config
    from .models._registry import lookup

    folder = Path(path)
    qfile, sfile = folder / QUANTIZATION_JSON, folder / QUANTIZED_FILE
    for f in (qfile, sfile, folder / "config.json"):
        if not f.exists():
            wanted = f"config.json, {QUANTIZATION_JSON}, {QUANTIZED_FILE}"
            raise st.CheckpointError(f"{f}: not found (a folder written by eqxlm.save_quantized has {wanted}).")
    meta = st.read_json(qfile, "quantization config")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise st.CheckpointError(f"{qfile}: format must be {FORMAT!r}, found {found!r}.")
    bits, group_size = meta.get("bits"), meta.get("group_size")
    try:
        _check_bits(bits, group_size)
    except ValueError as e:
        raise st.CheckpointError(f"{qfile}: {str(e).removeprefix('quantize: ')}") from None
    config = load_config(folder)
    if meta.get("model_type") != config.model_type:
        raise st.CheckpointError(f"{qfile}: model_type {meta.get('model_type')!r}, but config.json says {config.model_type!r}.")
    dtype = st.LOAD_DTYPES.get(meta.get("dtype"))
    if dtype is None:
        raise st.CheckpointError(f"{qfile}: dtype must be one of {sorted(st.LOAD_DTYPES)}, found {meta.get('dtype')!r}.")
    modules = meta.get("modules")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise st.CheckpointError(f"{qfile}: modules must be a non-empty list of layer names, found {modules!r:.80}.")
    generation_config = _load_generation_config(folder, config)
    _, model_cls = lookup(config.model_type)
    extra = {"scan_layers": True} if scan_layers else {}

    def build():
        model = model_cls(config, key=jax.random.key(0), dtype=dtype, generation_config=generation_config, **extra)
        return quantize(model, bits, group_size, where=_selected(modules))

    try:
        skeleton = eqx.filter_eval_shape(build)
    except ValueError as e:
        raise st.CheckpointError(f"{qfile}: does not fit config.json: {e}") from None
    expected = []
    for ref in param_refs(skeleton):
        tensor = CheckpointTensor(ref.name, (ref,), None, False)
        if bits == 4 and ref.name.endswith(".qweight"):  # packed two per byte
            expected.append(Expected(tensor, "U8", (*ref.shape[:-1], ref.shape[-1] // 2), _unpack4))
        else:
            expected.append(Expected(tensor, st.stored_name(ref.dtype)))
    reader = st.SafetensorsFile(sfile)
    what = f"config.json and {QUANTIZATION_JSON} ({config.model_type}, int{bits})"
    return fill(skeleton, dict.fromkeys(reader.keys(), reader), expected, source=folder, against=what)


def quantized_bytes(model) -> dict[str, int]:
    """Bytes held by the model's arrays: `int` (quantized weights), `float` (everything else)."""
    out = {"int": 0, "float": 0}
    for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array)):
        out["int" if jnp.issubdtype(leaf.dtype, jnp.integer) else "float"] += leaf.size * leaf.dtype.itemsize
    return out


__all__ = [
    "BITS",
    "DEFAULT_SKIP",
    "QuantizedLinear",
    "default_where",
    "load_quantized",
    "quantize",
    "quantized_bytes",
    "quantized_layers",
    "save_quantized",
]
