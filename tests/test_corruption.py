"""Corrupt and wrong checkpoint files get short errors of eqxlm's own types that name the file
and the tensor or field; nothing is written to the checkpoint's folder while loading.

The fuzz test draws one of a few random small checkpoints (built once per module: random
shapes, three families, float32/bfloat16, single file or shards) and one random corruption,
and requires either a correct load (every parameter equal, bit for bit, to the safetensors
library's reading of the corrupted folder, cast to the loaded dtype) or a `CheckpointError` /
`ConfigError` naming the culprit."""

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import eqxlm
from eqxlm import CheckpointError, ConfigError

BITS = {"float32": (torch.int32, np.int32), "bfloat16": (torch.int16, np.int16), "float16": (torch.int16, np.int16)}
TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _random_model(rng: np.random.Generator, kind: str, dtype: str):
    """A random small model, filled from numpy (no JAX random init: nothing to compile)."""
    heads = int(rng.choice([2, 4]))
    head_dim = int(rng.choice([4, 8]))
    common = dict(vocab_size=int(rng.integers(16, 80)), hidden_size=heads * head_dim)
    if kind == "bloom":
        cls, config = eqxlm.DecoderLM, eqxlm.BloomConfig(**common, n_layer=int(rng.integers(1, 3)), n_head=heads)
    else:
        fields = dict(
            **common,
            intermediate_size=int(rng.integers(8, 40)),
            num_hidden_layers=int(rng.integers(1, 3)),
            num_attention_heads=heads,
            num_key_value_heads=int(rng.choice([1, heads])),
            tie_word_embeddings=bool(rng.integers(2)),
            max_position_embeddings=64,
        )
        cls = eqxlm.DecoderLM
        config = (eqxlm.LlamaConfig if kind == "llama" else eqxlm.MistralConfig)(**fields)
    abstract = eqx.filter_eval_shape(lambda: cls(config, key=jax.random.key(0)))
    fill = lambda x: jax.device_put(rng.normal(0, 0.2, x.shape).astype(jnp.dtype(dtype)))  # noqa: E731
    return jax.tree.map(fill, abstract, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    rng = np.random.default_rng(0)
    out = []
    for i, (kind, dtype, sharded) in enumerate(
        [("llama", "float32", False), ("mistral", "bfloat16", True), ("bloom", "float32", True), ("llama", "bfloat16", True)]
    ):
        folder = tmp_path_factory.mktemp(f"base{i}")
        eqxlm.save_pretrained(_random_model(rng, kind, dtype), folder, max_shard_size=1000 if sharded else "5GB")
        assert (folder / "model.safetensors.index.json").exists() == sharded
        out.append(folder)
    return out


# -- corruptions: each returns (file name the message must contain, culprit it must contain or None)
def _header(path: Path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write_header(path: Path, header, body: bytes):
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + body)


def _tensor_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def truncate(folder, data):
    f = data.draw(st.sampled_from(_tensor_files(folder)))
    raw = f.read_bytes()
    f.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    return f.name, None


def header_length(folder, data):
    f = data.draw(st.sampled_from(_tensor_files(folder)))
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    new = data.draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(max(0, n - 16), n + 16)).filter(lambda v: v != n))
    f.write_bytes(new.to_bytes(8, "little") + raw[8:])
    return f.name, None


def garbage_header(folder, data):
    f = data.draw(st.sampled_from(_tensor_files(folder)))
    raw = bytearray(f.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start = data.draw(st.integers(8, 8 + n - 1))
    junk = data.draw(st.binary(min_size=1, max_size=12))
    raw[start : start + len(junk)] = junk[: max(0, 8 + n - start)]
    f.write_bytes(bytes(raw))
    return f.name, None


def wrong_shape(folder, data):
    f = data.draw(st.sampled_from(_tensor_files(folder)))
    header, body = _header(f)
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    shape = header[name]["shape"]
    new = data.draw(st.lists(st.integers(0, 64), min_size=0, max_size=3).filter(lambda s: s != shape))
    if data.draw(st.booleans()) and len(shape) == 2 and shape[0] != shape[1]:
        new = shape[::-1]  # same number of bytes: only the model's shape can catch it
    header[name]["shape"] = new
    _write_header(f, header, body)
    return f.name, name


def wrong_dtype(folder, data):
    f = data.draw(st.sampled_from(_tensor_files(folder)))
    header, body = _header(f)
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    header[name]["dtype"] = data.draw(st.sampled_from(["I32", "F16", "BF16", "F32", "I16", "U8", "F64", "BOOL", "X9"]))
    _write_header(f, header, body)
    return f.name, name


def index_entry(folder, data):
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return wrong_dtype(folder, data)
    raw = json.loads(index.read_text())
    name = data.draw(st.sampled_from(sorted(raw["weight_map"])))
    how = data.draw(st.sampled_from(["drop", "no_such_shard", "other_shard", "extra", "delete_shard", "no_weight_map"]))
    shards = sorted(set(raw["weight_map"].values()))
    culprit = name
    if how == "drop":
        del raw["weight_map"][name]
    elif how == "no_such_shard":
        raw["weight_map"][name] = culprit = "model-00099-of-00099.safetensors"
    elif how == "other_shard":
        raw["weight_map"][name] = next(s for s in shards if s != raw["weight_map"][name])
    elif how == "extra":
        raw["weight_map"][culprit := "model.layers.7.mlp.extra.weight"] = shards[0]
    elif how == "delete_shard":
        (folder / (culprit := raw["weight_map"][name])).unlink()
    else:
        del raw["weight_map"]
        culprit = "weight_map"
    index.write_text(json.dumps(raw))
    return index.name, culprit


def config_field(folder, data):
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    cls = eqxlm.models.lookup(raw["model_type"])[0]
    name = data.draw(st.sampled_from(sorted(k for k in cls.hf_fields if k in raw)))
    value = raw[name]
    if isinstance(value, bool):
        wrong = data.draw(st.sampled_from(["true", 1, None]))
    elif isinstance(value, str):
        wrong = data.draw(st.sampled_from([3, True, ["silu"]]))
    elif isinstance(value, float):
        wrong = data.draw(st.sampled_from([str(value), True, [value]]))
    elif isinstance(value, int):
        wrong = data.draw(st.sampled_from([str(value), float(value) + 0.5, True, [value]]))
    else:  # null, a list of ids or rope_parameters
        wrong = data.draw(st.sampled_from(["1", 1.5, True] if value is None else ["x", 2.5]))
    raw[name] = wrong
    path.write_text(json.dumps(raw))
    return "config.json", name


def bad_json(folder, data):
    name = data.draw(st.sampled_from(["config.json", "generation_config.json"]))
    path = folder / name
    text = path.read_text()
    new = text[: data.draw(st.integers(0, len(text) - 2))] + data.draw(st.sampled_from(["", "}", ",,", "\x00"]))
    path.write_text(new)
    try:
        json.loads(new)  # still valid ("{}"): the file is still the culprit, but not its syntax
        return name, None
    except json.JSONDecodeError:
        return name, "line"


def mixed_floats(folder, data):
    """Not a corruption: one tensor re-stored in another float dtype must load, unified."""
    from safetensors.numpy import load_file as load_numpy
    from safetensors.numpy import save_file

    f = data.draw(st.sampled_from(_tensor_files(folder)))
    tensors = load_numpy(f)
    name = data.draw(st.sampled_from(sorted(tensors)))
    tensors[name] = tensors[name].astype(jnp.dtype(data.draw(st.sampled_from(["float16", "bfloat16", "float32"]))))
    save_file(tensors, f, metadata={"format": "pt"})
    return f.name, name


CORRUPTIONS = [
    truncate,
    header_length,
    garbage_header,
    wrong_shape,
    wrong_dtype,
    index_entry,
    config_field,
    bad_json,
    mixed_floats,
]


def _snapshot(folder: Path):
    return sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir())


def _check_correct(model, folder: Path):
    """A load that succeeded must equal the safetensors library's reading, cast."""
    reference = {}
    for f in _tensor_files(folder):
        reference.update(load_file(f))
    params = eqxlm.hf_state_dict(model)  # by checkpoint key (BLOOM's differ from eqxlm's names)
    dtypes = {str(leaf.dtype) for leaf in params.values()}
    assert len(dtypes) == 1, dtypes  # never a mixed-dtype model
    (dtype,) = dtypes
    torch_int, np_int = BITS[dtype]
    for name, leaf in params.items():
        want = reference[name].to(TORCH[dtype]).view(torch_int).numpy()
        np.testing.assert_array_equal(np.asarray(leaf).view(np_int), want.reshape(np.shape(leaf)), err_msg=name)


@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_corruptions_load_correctly_or_name_the_culprit(bases, data):
    base = data.draw(st.sampled_from(bases), label="base")
    corrupt = data.draw(st.sampled_from(CORRUPTIONS), label="corruption")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        shutil.copytree(base, folder)
        file_name, culprit = corrupt(folder, data)
        before = _snapshot(folder)
        try:
            model = eqxlm.from_pretrained(folder)
        except (CheckpointError, ConfigError) as e:
            message = str(e)
            assert file_name in message, (corrupt.__name__, file_name, message)
            if culprit is not None:
                assert culprit in message, (corrupt.__name__, culprit, message)
            assert len(message.splitlines()) <= 6 and len(message) < 1500, message
            event(f"{corrupt.__name__}: refused")
        else:
            _check_correct(model, folder)
            event(f"{corrupt.__name__}: loaded")
        assert _snapshot(folder) == before  # nothing written while loading


# -- named cases from the issue ---------------------------------------------------------------
def test_truncated_file_names_file_and_tensor(bases, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(bases[0], folder)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as info:
        eqxlm.from_pretrained(folder)
    message = str(info.value)
    assert str(f) in message and "truncated" in message and "tensor " in message and len(message.splitlines()) == 1


def test_invalid_config_json_names_file_line_and_column(bases, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(bases[0], folder)
    (folder / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": 32,,\n}')
    with pytest.raises(CheckpointError, match=r"config\.json: invalid JSON at line 3, column 21"):
        eqxlm.from_pretrained(folder)
    (folder / "config.json").write_text((bases[0] / "config.json").read_text())
    (folder / "generation_config.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"generation_config\.json: invalid JSON at line 1"):
        eqxlm.from_pretrained(folder)
    (folder / "generation_config.json").write_text('{"bos_token_id": "1"}')
    with pytest.raises(ConfigError, match=r"generation_config\.json: bos_token_id: expected int \| None, got str '1'"):
        eqxlm.from_pretrained(folder)


def test_wrong_typed_config_value_is_refused_with_the_field(bases, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(bases[0], folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "hidden_size": str(raw["hidden_size"])}))
    with pytest.raises(ConfigError) as info:
        eqxlm.from_pretrained(folder)
    message = str(info.value)
    assert message == f"{folder / 'config.json'}: hidden_size: expected int, got str '{raw['hidden_size']}'."


@pytest.mark.parametrize(
    "fields,expected",
    [
        ({"hidden_size": "192"}, "hidden_size: expected int, got str '192'."),
        ({"num_hidden_layers": True}, "num_hidden_layers: expected int, got bool True."),
        ({"head_dim": 8.0}, "head_dim: expected int | None, got float 8.0."),
        ({"rms_norm_eps": "1e-6"}, "rms_norm_eps: expected float, got str '1e-6'."),
        ({"eos_token_id": (1, "2")}, "eos_token_id[1]: expected int, got str '2'."),
        ({"rope_scaling": eqxlm.nn.LinearScaling("2")}, "rope_scaling.factor: expected float, got str '2'."),
        ({"attention_bias": 1}, "attention_bias: expected bool, got int 1."),
    ],
)
def test_config_construction_checks_every_annotation(fields, expected):
    with pytest.raises(ConfigError) as info:
        eqxlm.LlamaConfig(**fields)
    assert str(info.value) == expected


def test_config_accepts_what_its_annotations_allow():
    config = eqxlm.LlamaConfig(rms_norm_eps=1, num_key_value_heads=None, eos_token_id=[1, 2], rope_theta=500000)
    assert config.eos_token_id == (1, 2) and config.rms_norm_eps == 1
    for cls in (eqxlm.LlamaConfig, eqxlm.MistralConfig, eqxlm.BloomConfig):  # every default conforms
        assert dataclasses.asdict(cls()) is not None


# -- the reader alone ----------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(["float32", "bfloat16", "float16", "int32", "uint8"]))
def test_reader_reads_any_box_rows_or_whole_tensor_exactly(data, dtype):
    """Whole tensors, leading-row ranges and arbitrary boxes (a device's shard) equal numpy's
    own slicing of the tensor, for every dtype (bfloat16 included)."""
    from safetensors.numpy import save_file

    from eqxlm._safetensors import SafetensorsFile

    shape = tuple(data.draw(st.lists(st.integers(0, 5), min_size=0, max_size=3), label="shape"))
    value = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape).astype(jnp.dtype(dtype))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.safetensors"
        save_file({"a": np.ones(3, np.float16), "t": value}, path)
        reader = SafetensorsFile(path)
        whole = reader.read("t")
        assert whole.dtype == value.dtype and whole.shape == shape and whole.tobytes() == value.tobytes()
        box = tuple(slice(a, a + data.draw(st.integers(0, n - a))) for n in shape for a in [data.draw(st.integers(0, n))])
        got = reader.read("t", box)
        assert got.dtype == value.dtype and got.tobytes() == np.ascontiguousarray(value[box]).tobytes()
        if shape:
            rows = box[0]
            assert reader.read("t", rows).tobytes() == np.ascontiguousarray(value[rows]).tobytes()
