"""Test configuration: strict JAX promotion (as equinox's own suite), shared fixtures.

Oracles: transformers (PyTorch, CPU) at the version pinned in pyproject's `test` extra.
Tolerances (float32): parts 1e-6, layers 1e-5, model logits 1e-4.
"""

import os
from pathlib import Path

# XLA's LLVM backend at -O0 for the default suite: tiny models spend most of their time
# compiling, and this compiles them faster (measured: benchmarks/NOTES.md, "The test suite's
# XLA level"). The math is the same (XLA:CPU does not use fast-math), but results can move
# by float32 rounding: LLVM contracts multiply-adds into FMAs only when optimizing. Every tolerance here is above
# that (the scanned-layout check compares accuracy against float64 for this reason). CI's
# second step runs at XLA's default level: EQXLM_TEST_XLA_OPT=default.
if os.environ.get("EQXLM_TEST_XLA_OPT") != "default":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

import torch  # noqa: E402

torch.manual_seed(0)
torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = Path(os.environ.get("EQXLM_SHARED", REPO.parent / "shared")) / "models"

PART_ATOL = 1e-6
LAYER_ATOL = 1e-5
LOGITS_ATOL = 1e-4


def shared_model(name: str) -> Path:
    path = SHARED_MODELS / name
    if not (path / "config.json").exists():
        pytest.skip(
            f"../shared/models/{name} is not present (the team's shared folder sits beside the checkout); "
            "set EQXLM_SHARED to its location to run this test."
        )
    return path
