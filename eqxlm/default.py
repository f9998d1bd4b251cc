"""The embedded default model: a small Mistral trained by eqxlm itself.

`eqxlm.from_pretrained("eqxlm/default")` (or `eqxlm.from_pretrained(default_model_path())`)
loads it from the installed package, offline. It was built by
`scripts/train_default_model.py`; `training_log.json` beside the weights records how.
"""

from pathlib import Path

DEFAULT_MODEL = "eqxlm/default"


def default_model_path() -> Path:
    """The folder of the embedded default model inside the installed package."""
    path = Path(__file__).parent / "default_model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"the embedded default model is missing from {path}; rebuild it with "
            "`python scripts/train_default_model.py --out eqxlm/default_model`."
        )
    return path
