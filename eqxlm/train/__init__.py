"""Training runs that outgrow a notebook: `eqxlm train` and its Python API.

    from eqxlm.train import TrainConfig, run_training
    run = run_training(TrainConfig(data=("notes.txt",), output_dir="runs/a", steps=300))

Needs the `train` extra (`pip install "eqxlm[train]"`: Orbax for checkpoints, Grain for the
data pipeline); the core package imports without it. See `TrainConfig` for every option and
the README ("Training runs") for multi-process launches. (`eqxlm.training` holds the
building blocks: loss, optimiser, step, and `fit`, a small in-memory loop.)
"""

from ._config import TrainConfig
from ._data import DataError, pack, read_documents, split_documents, token_stream
from ._loop import Run, TrainError, complete_steps, make_step, model_identity, parse_mesh, plot_losses, run_training

__all__ = [
    "DataError",
    "Run",
    "TrainConfig",
    "TrainError",
    "complete_steps",
    "make_step",
    "model_identity",
    "pack",
    "parse_mesh",
    "plot_losses",
    "read_documents",
    "run_training",
    "split_documents",
    "token_stream",
]
