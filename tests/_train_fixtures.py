"""Shared by the trainer tests: a tiny Llama checkpoint with the default model's tokenizer,
a corpus of PSF-licensed text from CPython's `pydoc_data`, and a runner for `eqxlm train`."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax

import eqxlm

REPO = Path(__file__).resolve().parents[1]
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR"}


def tiny_llama(folder: Path, *, hidden: int = 32, seed: int = 0) -> Path:
    config = eqxlm.LlamaConfig(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=0.1,
    )
    eqxlm.save_pretrained(eqxlm.DecoderLM(config, key=jax.random.key(seed)), folder)
    shutil.copy(eqxlm.default_model_path() / "tokenizer.json", folder / "tokenizer.json")
    return folder


def corpus(path: Path, n: int = 40) -> Path:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    docs = [topics[k].strip().replace("\n\n", "\n") for k in sorted(topics)][:n]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def _popen_args(args: list[str], *, devices: int = 1, driver: list[str] | None = None, extra_env=None):
    env = {
        **os.environ,
        **QUIET,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "PYTHONPATH": str(REPO),
        **(extra_env or {}),
    }
    if driver is None:
        command = [sys.executable, "-m", "eqxlm.cli", "train", *args]
    else:
        command = [sys.executable, str(REPO / "tests" / "train_driver.py"), *driver, "--", *args]
    return (command,), {"env": env, "cwd": REPO, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}


def run_train(args: list[str], *, devices: int = 1, driver: list[str] | None = None, timeout: int = 600, extra_env=None):
    """`eqxlm train ARGS` in a fresh process (through tests/train_driver.py when `driver` is given),
    with `devices` simulated CPU devices."""
    (command,), kwargs = _popen_args(args, devices=devices, driver=driver, extra_env=extra_env)
    return subprocess.run(command, timeout=timeout, **kwargs)


run_train.popen_args = _popen_args


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its bytes (to prove nothing was touched)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


class RecordingBar:
    """A stand-in for `tqdm` that records `(count, loss shown)` at every `set_postfix`."""

    shown: list[tuple[int, str]] = []

    def __init__(self, iterable=None, *, total=None, initial=0, **kwargs):
        self.n = initial
        RecordingBar.shown = []

    def update(self, n=1):
        self.n += n

    def set_postfix(self, **kwargs):
        RecordingBar.shown.append((self.n, kwargs["loss"]))

    def close(self):
        pass
