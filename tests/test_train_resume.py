"""`eqxlm train` killed with SIGKILL and resumed reproduces the never-stopped run bitwise; a
checkpoint half-written when the process died is never taken as the latest.

Each run is a fresh process (`tests/train_driver.py` kills it at a chosen moment)."""

import shutil

import grain  # noqa: E402,F401
import orbax.checkpoint  # noqa: E402,F401  (in the test extra: a missing install fails, never skips)
import pytest
from _train_fixtures import corpus, metrics, run_train, tiny_llama

from eqxlm.train import complete_steps

ARGS = ["--seq-len", "32", "--batch-size", "4", "--learning-rate", "3e-3", "--eval-every", "5", "--no-progress", "--no-plot"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return {"model": tiny_llama(root / "model"), "data": corpus(root / "docs.txt"), "root": root}


def _args(files, out, steps=12, save_every=4):
    return ["--model", str(files["model"]), "--data", str(files["data"]), "--output-dir", str(out), "--steps", str(steps),
            "--save-every", str(save_every), *ARGS]  # fmt: skip


# -- resume after SIGKILL reproduces the run bitwise -----------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(files):
    out = files["root"] / "uninterrupted"
    run = run_train(_args(files, out))
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def _losses(rows):
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in rows]


@pytest.mark.parametrize(
    "driver, complete",
    [
        pytest.param(["kill-before-step", "7", "4"], [4], marks=[pytest.mark.slow, pytest.mark.ci]),  # ~35 s more
        (["kill-in-finalize", "8"], [4]),
    ],
    ids=["killed-between-checkpoints", "killed-while-finalizing-a-checkpoint"],
)
def test_resume_after_sigkill_reproduces_every_later_loss_bitwise(files, uninterrupted, driver, complete):
    out = files["root"] / f"killed-{driver[0]}"
    killed = run_train(_args(files, out), driver=driver)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])  # SIGKILL
    # The half-written step (if any) is never a complete checkpoint: only step 4 counts.
    assert complete_steps(out / "checkpoints") == complete
    if driver[0] == "kill-in-finalize":
        assert any(p.name.startswith("8.orbax-checkpoint-tmp") for p in (out / "checkpoints").iterdir())
    assert max(r["step"] for r in metrics(out)) >= 4
    resumed = run_train([*_args(files, out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Every loss (training and held-out) equals the never-stopped run's, bit for bit.
    assert _losses(metrics(out)) == _losses(metrics(uninterrupted))
    assert (out / "export" / "model.safetensors").read_bytes() == (uninterrupted / "export" / "model.safetensors").read_bytes()
    assert complete_steps(out / "checkpoints") == [4, 8, 12]


def test_planted_half_written_steps_are_never_latest(files, uninterrupted, tmp_path):
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(uninterrupted / "checkpoints", ckpt)
    (ckpt / "16.orbax-checkpoint-tmp-1234567" / "state").mkdir(parents=True)  # died before its rename
    bare = ckpt / "20"
    shutil.copytree(ckpt / "12", bare)  # a finalized-looking folder without the commit marker
    (bare / "commit_success.txt").unlink()
    assert complete_steps(ckpt) == [4, 8, 12]
