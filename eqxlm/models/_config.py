"""Frozen configs with Hugging Face field names, and their strict `config.json` reader.

Every field of a `config.json` is either **handled** (it becomes a config field), on a
documented **ignore list** (it cannot change the forward computation: bookkeeping,
dropout rates, fused-kernel switches of the original training code), or refused with a
`ConfigError` that names it. Ignored fields are kept verbatim in `extra` so that
`save_pretrained` writes them back unchanged.
"""

import dataclasses
import functools
import json
import types
import typing
from typing import Any, ClassVar, Literal, Union

from ..nn import RopeScaling, rope_scaling_from_hf
from ..nn._activations import UnsupportedActivation


class ConfigError(ValueError):
    """A `config.json` field that eqxlm does not support (the message names it)."""


# Bookkeeping that `save_pretrained` writes afresh: accepted, not kept.
REGENERATED = frozenset({"architectures", "dtype", "torch_dtype", "transformers_version"})
#: Fields any transformers config may carry that cannot change the forward pass, with why
#: (kept verbatim and written back on export).
COMMON_IGNORED: dict[str, str] = {
    "_name_or_path": "bookkeeping",
    "architectures": "bookkeeping (rewritten on export)",
    "dtype": "bookkeeping; the loader reads it as the default dtype",
    "torch_dtype": "bookkeeping; the loader reads it as the default dtype",
    "transformers_version": "bookkeeping",
    "use_cache": "a runtime switch of transformers' forward; eqxlm's cache is an argument",
    "output_attentions": "a runtime switch; eqxlm's is an argument",
    "output_hidden_states": "a runtime switch; eqxlm's is an argument",
    "return_dict": "a runtime switch of transformers' output type",
    "use_return_dict": "a runtime switch of transformers' output type",
    "id2label": "classification heads only",
    "label2id": "classification heads only",
    "problem_type": "classification heads only",
    "chunk_size_feed_forward": "a memory-saving loop with identical results",
    "is_encoder_decoder": "always false for decoder-only models",
    "attention_dropout": "dropout: training only (eqxlm's forward is deterministic)",
    "hidden_dropout": "dropout: training only",
    "tokenizer_class": "tokenizer bookkeeping",
    "_attn_implementation": "transformers' kernel choice, same numbers",
    "_attn_implementation_autoset": "transformers' kernel choice, same numbers",
}


def _type_name(tp) -> str:
    """An annotation as a reader writes it: `int`, `int | None`, `tuple[int, ...]`."""
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _mismatch(value, tp, name: str) -> str | None:
    """Why `value` does not conform to annotation `tp` (None when it does). Python's own
    rules, made strict where JSON makes mistakes likely: a bool is not an int, an int is
    a float, a list is not a tuple (configs hold tuples so they stay hashable)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return None
    if origin in (Union, types.UnionType):
        reasons = [_mismatch(value, member, name) for member in args]
        if all(reasons):
            nested = [r for r in reasons if r and not r.startswith(f"{name}: expected ")]
            return nested[0] if len(nested) == 1 else f"{name}: expected {_type_name(tp)}, got {_describe(value)}"
        return None
    if origin is Literal:
        return None if value in args else f"{name}: expected one of {', '.join(map(repr, args))}, got {_describe(value)}"
    if origin is tuple:
        if not isinstance(value, tuple):
            return f"{name}: expected {_type_name(tp)}, got {_describe(value)}"
        items = [(i, args[0]) for i in range(len(value))] if len(args) == 2 and args[1] is Ellipsis else list(enumerate(args))
        if len(items) != len(value):
            return f"{name}: expected {_type_name(tp)}, got {_describe(value)}"
        for i, item_tp in items:
            reason = _mismatch(value[i], item_tp, f"{name}[{i}]")
            if reason:
                return reason
        return None
    if origin is not None:  # dict[...], list[...]: the container type only
        return None if isinstance(value, origin) else f"{name}: expected {_type_name(tp)}, got {_describe(value)}"
    if tp is type(None):
        ok = value is None
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(tp, type):
        ok = isinstance(value, tp)
    else:
        return None  # an annotation this checker does not interpret
    if not ok:
        return f"{name}: expected {_type_name(tp)}, got {_describe(value)}"
    if dataclasses.is_dataclass(value):
        return _dataclass_mismatch(value, f"{name}.")
    return None


@functools.cache
def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _dataclass_mismatch(obj, prefix: str = "") -> str | None:
    for name, tp in _field_types(type(obj)).items():
        reason = _mismatch(getattr(obj, name), tp, prefix + name)
        if reason:
            return reason
    return None


def check_field_types(obj) -> None:
    """Check every field of dataclass `obj` (nested dataclasses included) against its
    annotation; raise `ConfigError` naming the first field that does not conform, with the
    expected type and the value found (`hidden_size: expected int, got str '192'.`)."""
    reason = _dataclass_mismatch(obj)
    if reason:
        raise ConfigError(f"{reason}.")


def _eos_tuple(value) -> tuple[int, ...] | None:
    return tuple(value) if isinstance(value, list) else (value,)


class _FieldNames:
    """`hf_fields` derived from the dataclass fields: each field under its own name, or the
    Hugging Face name `hf_names` gives it (`extra` excluded). A class may set `hf_fields` itself."""

    def __get__(self, obj, cls) -> dict[str, str]:
        return _hf_fields(cls)


@functools.cache
def _hf_fields(cls) -> dict[str, str]:
    return {cls.hf_names.get(f.name, f.name): f.name for f in dataclasses.fields(cls) if f.name != "extra"}


#: The attention types a `layer_types` entry may name.
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BaseConfig:
    """What every architecture's config shares: vocabulary, special ids, initialisation,
    tying, and the verbatim `extra` fields. Subclasses list their own fields."""

    model_type: ClassVar[str]
    architecture: ClassVar[str]
    #: HF name -> dataclass field, for the fields this architecture handles: by default every
    #: field, under its own name or the one `hf_names` (field -> HF name) gives it.
    hf_fields = _FieldNames()
    hf_names: ClassVar[dict[str, str]] = {}
    #: Fields on top of COMMON_IGNORED that cannot change this family's numbers, with why.
    ignored_fields: ClassVar[dict[str, str]] = {}
    #: The `config.json` field that names the MLP's activation (an unsupported one is refused by it).
    activation_field: ClassVar[str] = "hidden_act"

    vocab_size: int
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] | None = (2,)  # a tuple: HF allows a list
    pad_token_id: int | None = None
    #: Ignored-but-kept `config.json` fields, as (name, JSON text) pairs.
    extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        eos = self.eos_token_id
        if isinstance(eos, list) or (isinstance(eos, int) and not isinstance(eos, bool)):
            object.__setattr__(self, "eos_token_id", _eos_tuple(eos))
        for name, tp in _field_types(type(self)).items():  # JSON lists where the config holds tuples
            value = getattr(self, name)
            if isinstance(value, list) and "tuple" in str(tp):
                object.__setattr__(self, name, tuple(value))
        check_field_types(self)  # before any subclass check does arithmetic on a field
        self._check_shared()

    def _check_shared(self):
        """The checks of fields many families share, run where the config has the field:
        `num_key_value_heads` (>= 1, dividing `num_attention_heads`), `layer_types` (one known
        type per layer) and `sliding_window` (>= 1 or null, where a layer uses it)."""
        fields = _field_types(type(self))
        if "num_key_value_heads" in fields and not (self.kv_heads >= 1 and self.num_attention_heads % self.kv_heads == 0):
            raise ConfigError(
                f"num_key_value_heads ({self.kv_heads}) must divide num_attention_heads ({self.num_attention_heads})."
            )
        if getattr(self, "layer_types", None) is not None:
            n = self.num_hidden_layers
            if set(self.layer_types) - set(LAYER_TYPES) or len(self.layer_types) != n:
                raise ConfigError(f"layer_types: expected {n} of {LAYER_TYPES}, got {list(self.layer_types)}.")
        window = getattr(self, "sliding_window", None)
        used = getattr(self, "use_sliding_window", True) and (
            "layer_types" not in fields or "sliding_attention" in self.types_by_layer()
        )
        if window is not None and window < 1 and used:
            raise ConfigError(f"sliding_window must be >= 1 or null, got {window}.")

    # -- fields many families share -----------------------------------------------------
    @property
    def kv_heads(self) -> int:
        """`num_key_value_heads`, None meaning `num_attention_heads`."""
        kv = getattr(self, "num_key_value_heads", None)
        return self.num_attention_heads if kv is None else kv

    @property
    def dim_per_head(self) -> int:
        """`head_dim`, None (or no such field) meaning `hidden_size // num_attention_heads`."""
        return getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads

    def layer_slides(self, i: int) -> bool:
        """Whether layer `i` is a sliding layer when `layer_types` is absent, as the family's
        transformers config derives it."""
        raise NotImplementedError(f"{type(self).__name__} derives no layer_types.")

    def types_by_layer(self) -> tuple[str, ...]:
        """Each layer's attention type: `layer_types`, or as transformers derives it."""
        return self.layer_types or tuple(
            "sliding_attention" if self.layer_slides(i) else "full_attention" for i in range(self.num_hidden_layers)
        )

    def windows_by_layer(self) -> tuple[int | None, ...]:
        """Each layer's attention window: `sliding_window` on sliding layers, None on the others."""
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in self.types_by_layer())

    def rope_spec(self, theta: float | None = None, scaling: RopeScaling | None = None, **options):
        """The [`RopeSpec`][eqxlm.models.RopeSpec] of `rope_theta` and `rope_scaling` (or of
        the `theta` and `scaling` given), with what a scaling derives from
        `max_position_embeddings` filled in; `options` as `RopeSpec`'s."""
        from ._builder import RopeSpec

        if theta is None:
            theta, scaling = self.rope_theta, self.rope_scaling
        if scaling is not None:
            scaling = scaling.resolve(self.max_position_embeddings)
        return RopeSpec(theta, scaling, **options)

    def check_spec(self):
        """Build the family's spec once, so a choice eqxlm lacks is refused at construction."""
        try:
            self.decoder_spec()
        except NotImplementedError:
            pass
        except UnsupportedActivation as e:
            raise ConfigError(f"{self.activation_field}: {e}") from None
        except ValueError as e:
            raise ConfigError(str(e)) from None

    # -- family knowledge ---------------------------------------------------------------
    def decoder_spec(self):
        """The family's [`DecoderSpec`][eqxlm.models.DecoderSpec] (builder families)."""
        raise NotImplementedError(f"{type(self).__name__} builds no DecoderLM; register its own model class.")

    def key_map(self):
        """How parameter names map onto this family's checkpoint keys (identity by default)."""
        from ..params import KeyMap

        return KeyMap()

    def partition_rules(self):
        """Sharding rules over parameter names (`eqxlm.params.DEFAULT_RULES` by default)."""
        from ..params import DEFAULT_RULES

        return DEFAULT_RULES

    # -- reading -----------------------------------------------------------------------
    @classmethod
    def _normalise(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Architecture hook: rewrite aliases / nested fields before the whitelist check."""
        return dict(raw)

    @classmethod
    def _rope_from_hf(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Fold the rope fields into `rope_theta`, `rope_scaling` (and `partial_rotary_factor`),
        for a config with those fields (see `read_rope`)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if "rope_scaling" not in fields:
            return raw
        partial = fields.get("partial_rotary_factor")
        return read_rope(raw, fields["rope_theta"].default, None if partial is None else partial.default)

    def _rope_to_hf(self, out: dict[str, Any]) -> dict[str, Any]:
        """The rope fields of `out` written back as one transformers 5 `rope_parameters` dict."""
        if "rope_scaling" in out:
            rope = rope_to_hf(out.pop("rope_theta"), out.pop("rope_scaling"))
            if "partial_rotary_factor" in out:
                rope["partial_rotary_factor"] = out.pop("partial_rotary_factor")
            out["rope_parameters"] = rope
        return out

    @classmethod
    def from_hf(cls, raw: dict[str, Any]):
        """Read a `config.json` dict. Raises `ConfigError` naming any unsupported field."""
        raw = cls._rope_from_hf(cls._normalise(raw))
        model_type = raw.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ConfigError(f"model_type: expected {cls.model_type!r}, got {model_type!r}.")
        kwargs, extra, unknown = {}, [], []
        for name, value in raw.items():
            if name in cls.hf_fields:
                kwargs[cls.hf_fields[name]] = value
            elif name in REGENERATED:
                continue
            elif name in COMMON_IGNORED or name in cls.ignored_fields:
                extra.append((name, json.dumps(value, sort_keys=True)))
            else:
                unknown.append(name)
        if unknown:
            raise ConfigError(
                f"unsupported config field(s) for {cls.model_type}: {', '.join(sorted(unknown))}. "
                "eqxlm refuses fields it does not implement rather than silently computing "
                "something else."
            )
        config = cls(**kwargs, extra=tuple(sorted(extra)))
        config.check_spec()
        return config

    # -- writing -----------------------------------------------------------------------
    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict (HF names; ignored fields written back verbatim)."""
        out: dict[str, Any] = {name: json.loads(text) for name, text in self.extra}
        for hf_name, field in self.hf_fields.items():
            out[hf_name] = getattr(self, field)
        eos = out.get("eos_token_id")
        if eos is not None:
            out["eos_token_id"] = eos[0] if len(eos) == 1 else list(eos)
        if "layer_types" in out:
            out["layer_types"] = self.types_by_layer()
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in self._rope_to_hf(out).items()}
        out["model_type"] = self.model_type
        out["architectures"] = [self.architecture]
        return out


def read_rope(raw: dict[str, Any], default_theta: float, default_partial: float | None = None) -> dict[str, Any]:
    """Fold transformers 4's `rope_theta` + `rope_scaling` and transformers 5's
    `rope_parameters` of `raw` into `rope_theta` (`default_theta` when absent) and a
    `RopeScaling` (None for `default`), and, where `default_partial` is given,
    `partial_rotary_factor` (from `rope_parameters`, else the top level, else the default).
    A scaling with an `original_max_position_embeddings` field takes `max_position_embeddings`
    when it lacks one, as transformers' `standardize_rope_params` does."""
    raw = dict(raw)
    params = raw.pop("rope_parameters", None) or {}
    scaling = raw.pop("rope_scaling", None) or {}
    for name, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected an object (or null), got {type(value).__name__} {value!r:.40}.")
    merged = {**scaling, **params}
    if default_partial is not None:
        raw["partial_rotary_factor"] = merged.pop("partial_rotary_factor", raw.get("partial_rotary_factor", default_partial))
    merged.setdefault("rope_theta", raw.get("rope_theta", default_theta))
    raw["rope_theta"], raw["rope_scaling"] = rope_from_hf(merged, raw.get("max_position_embeddings"))
    return raw


def rope_from_hf(params: dict[str, Any], max_position_embeddings: int | None = None) -> tuple[Any, RopeScaling | None]:
    """One `rope_parameters` dict as (`rope_theta`, `RopeScaling` or None for `default`). A
    `partial_rotary_factor` beside a `default` type is dropped (a family that reads it takes it
    out first); an unsupported type or field raises `ConfigError` naming it."""
    params = dict(params)
    theta = params.pop("rope_theta")
    # Floats as floats; a wrong-typed value is left for the config's type check to name.
    theta = float(theta) if isinstance(theta, int) and not isinstance(theta, bool) else theta
    if params.get("rope_type", params.get("type", "default")) == "default":
        params.pop("partial_rotary_factor", None)
    try:
        scaling = rope_scaling_from_hf(params, max_position_embeddings=max_position_embeddings)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return theta, None if type(scaling) is RopeScaling else scaling


def rope_to_hf(theta: float, scaling: RopeScaling | None) -> dict[str, Any]:
    """The transformers 5 `rope_parameters` dict of `theta` and `scaling`."""
    return {"rope_theta": theta, **(scaling or RopeScaling()).to_hf()}
