"""`TrainConfig`: every option of a training run, one frozen dataclass.

The `eqxlm train` command builds its flags from these fields (names with `-` for `_`, the
help text from each field's `help` metadata), so the command and the Python API cannot drift.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class TrainConfig:
    """Options of `eqxlm.train.run_training`. Only `data` and `output_dir` are required."""

    data: tuple[str, ...] = _opt(
        (),
        "text (.txt: documents separated by blank lines) or JSONL (.jsonl: one document per line, "
        "in the `text_field` field) files",
        nargs="+",
    )
    output_dir: str = _opt(
        "",
        "run folder: train_config.json, metrics.jsonl, loss.png, checkpoints/ and, at the end, export/ (a Hugging Face folder)",
    )
    model: str | None = _opt(
        None,
        "checkpoint to fine-tune: a local Hugging Face folder or a hub repo id (`eqxlm/default` is the "
        "embedded model); default eqxlm/default unless --model-config is given",
    )
    model_config: str | None = _opt(
        None,
        "train a fresh, randomly initialised model from this config.json (or a folder holding one) instead "
        "of a checkpoint; needs --tokenizer unless the folder has tokenizer.json",
    )
    tokenizer: str | None = _opt(None, "tokenizer.json (or a folder holding one); default: the checkpoint's")
    revision: str | None = _opt(None, "hub branch, tag or commit of --model")
    text_field: str = _opt("text", "the JSONL field holding a document's text")
    seq_len: int = _opt(
        128, "tokens per packed training sequence (documents are joined with EOS and cut into windows of this length)"
    )
    batch_size: int = _opt(8, "sequences per optimiser step, over all processes (divided into --grad-accum micro-batches)")
    grad_accum: int = _opt(1, "micro-batches per optimiser step (gradient accumulation); must divide --batch-size")
    steps: int = _opt(100, "optimiser steps in the whole run")
    learning_rate: float = _opt(1e-4, "peak learning rate of AdamW (linear warm-up, then cosine decay to 10%%)")
    warmup_steps: int | None = _opt(None, "warm-up steps (default: 5%% of --steps, at least 1)")
    weight_decay: float = _opt(0.1, "AdamW weight decay, on matrices only")
    max_grad_norm: float = _opt(1.0, "clip gradients to this global norm")
    adam_b1: float = _opt(0.9, "AdamW beta1")
    adam_b2: float = _opt(0.95, "AdamW beta2")
    seed: int = _opt(0, "seed of the data shuffle, the held-out split, the RNG key and a fresh model's initialisation")
    eval_fraction: float = _opt(0.05, "fraction of documents held out for evaluation (0 = none)")
    eval_every: int = _opt(50, "evaluate on the held-out documents every N steps (and at the end; 0 = only at the end)")
    log_every: int = _opt(1, "write a metrics row every N steps")
    save_every: int = _opt(100, "save a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = _opt(3, "how many of the latest checkpoints to keep")
    async_checkpointing: bool = _opt(True, "write checkpoints in the background while training continues")
    mixed_precision: bool = _opt(False, "bfloat16 compute with float32 master weights, gradients and optimiser state")
    remat: bool = _opt(False, "recompute each decoder layer's activations in the backward pass (less memory, more compute)")
    fixed_order_reductions: bool = _opt(
        False,
        "sum the batch shards' losses and gradients (and held-out losses) in a fixed order (gather, then add) instead "
        "of an all-reduce: "
        "bitwise the same result on any number of processes for a data-parallel mesh, for the memory of one "
        "gradient per batch shard on each device",
    )
    mesh: str = _opt(
        "data=-1",
        "device mesh as AXIS=SIZE pairs over data, fsdp, tensor, e.g. `fsdp=4,tensor=2`; -1 = all "
        "remaining devices (of every process)",
    )
    resume: bool = _opt(
        False, "continue from the latest complete checkpoint in --output-dir (the options must equal the saved ones)"
    )
    export: bool = _opt(True, "write the trained model as a Hugging Face folder (output_dir/export) at the end")
    progress: bool = _opt(True, "show a progress bar (on process 0)")
    plot: bool = _opt(True, "draw loss.png at the end (needs matplotlib; skipped without it)")
    coordinator_address: str | None = _opt(
        None, "multi-process: HOST:PORT of process 0's coordinator (or env JAX_COORDINATOR_ADDRESS)"
    )
    num_processes: int | None = _opt(None, "multi-process: number of processes (or env EQXLM_NUM_PROCESSES)")
    process_id: int | None = _opt(None, "multi-process: this process's index, 0..num_processes-1 (or env EQXLM_PROCESS_ID)")

    # Options that may change when resuming: they do not change what is computed.
    RESUMABLE = frozenset(
        {
            "resume",
            "output_dir",  # a moved run folder
            "progress",
            "plot",
            "export",
            "async_checkpointing",
            "keep_checkpoints",
            "save_every",
            "log_every",
            "coordinator_address",
            "process_id",
        }
    )

    def __post_init__(self):
        object.__setattr__(self, "data", tuple(str(p) for p in ((self.data,) if isinstance(self.data, str) else self.data)))
        object.__setattr__(self, "output_dir", str(self.output_dir))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Refuse impossible values, naming the option (no file or device is touched)."""
        if not self.data:
            raise ValueError("TrainConfig.data: give at least one data file.")
        if not self.output_dir:
            raise ValueError("TrainConfig.output_dir: give a folder for the run.")
        if self.model is not None and self.model_config is not None:
            raise ValueError("TrainConfig: give either model (a checkpoint) or model_config (a fresh model), not both.")
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "log_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be at least 1, got {getattr(self, name)}.")
        if self.seq_len < 2:
            raise ValueError(f"TrainConfig.seq_len must be at least 2 (one prediction), got {self.seq_len}.")
        if self.eval_every < 0:
            raise ValueError(f"TrainConfig.eval_every must be >= 0, got {self.eval_every}.")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"TrainConfig.batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum}).")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"TrainConfig.eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        bounds = {  # written as `ok` tests so that NaN fails them too
            "learning_rate": (self.learning_rate > 0, "positive"),
            "max_grad_norm": (self.max_grad_norm > 0, "positive"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "adam_b1": (0 <= self.adam_b1 < 1, "in [0, 1)"),
            "adam_b2": (0 <= self.adam_b2 < 1, "in [0, 1)"),
            "warmup_steps": (self.warmup_steps is None or self.warmup_steps >= 0, ">= 0"),
            "num_processes": (self.num_processes is None or self.num_processes >= 1, "at least 1"),
            "process_id": (self.process_id is None or self.process_id >= 0, ">= 0"),
        }
        for name, (ok, bound) in bounds.items():
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {bound}, got {getattr(self, name)}.")

    def changed_from(self, saved: dict) -> list[str]:
        """Fields (other than `RESUMABLE` ones) whose values differ from a saved config."""
        now = json.loads(json.dumps(self.to_json()))
        diffs = []
        for name in sorted(set(now) | set(saved)):
            if name in self.RESUMABLE:
                continue
            if now.get(name) != saved.get(name):
                diffs.append(f"{name}: saved {saved.get(name)!r}, now {now.get(name)!r}")
        return diffs

    @classmethod
    def from_json_file(cls, path: str | Path) -> dict:
        return json.loads(Path(path).read_text())
