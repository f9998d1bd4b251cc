"""The README's "Look inside" and "LoRA" examples run as written, in order."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(title: str) -> list[str]:
    text = README.read_text()
    section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_look_inside_and_lora_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    capture, patch = _blocks("Look inside")
    (lora_example,) = _blocks("LoRA adapters")
    assert len(capture.strip().splitlines()) == 5 and len(patch.strip().splitlines()) == 5
    namespace: dict = {}
    exec("import jax, jax.numpy as jnp, numpy as np, equinox as eqx, eqxlm", namespace)
    for code in (capture, patch, lora_example):
        exec(compile(code, str(README), "exec"), namespace)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
