"""The registry: `model_type` -> (config class, model class).

Each family registers itself at the end of its own file (`register(LlamaConfig)`), and
`eqxlm/models/__init__.py` imports each family file once (the one registry line). A user
registers a model of their own the same way: `eqxlm.register(MyConfig, MyModel)`; then
`from_pretrained`/`save_pretrained` handle its `model_type` like any other.
"""

_REGISTRY: dict[str, tuple[type, type]] = {}


def register(config_class: type, model_class: type | None = None) -> type:
    """Register `config_class` (with a `model_type` class attribute) and the model class
    built from it (default: the builder's `DecoderLM`). Returns `config_class`."""
    if model_class is None:
        from ._builder import DecoderLM

        model_class = DecoderLM
    model_type = getattr(config_class, "model_type", None)
    if not isinstance(model_type, str):
        raise TypeError(f"register: {config_class.__name__} needs a `model_type` class attribute (a string).")
    _REGISTRY[model_type] = (config_class, model_class)
    return config_class


def supported_model_types() -> tuple[str, ...]:
    """Every registered `model_type`, sorted."""
    return tuple(sorted(_REGISTRY))


def lookup(model_type: str) -> tuple[type, type]:
    """(config class, model class) of `model_type`; KeyError when not registered."""
    return _REGISTRY[model_type]


def families_table() -> str:
    """The README's table of supported families, generated from the registry: each
    config class's `model_type`, `architecture`, `features` and `refused` class attributes."""
    rows = ["| family | `model_type` | distinctive features | refused |", "|---|---|---|---|"]
    for model_type in supported_model_types():
        config_class, _ = _REGISTRY[model_type]
        if not config_class.__module__.startswith("eqxlm."):
            continue  # a user's registration
        features = getattr(config_class, "features", "")
        refused = getattr(config_class, "refused", "") or "-"
        rows.append(f"| {config_class.architecture} | `{model_type}` | {features} | {refused} |")
    return "\n".join(rows)
