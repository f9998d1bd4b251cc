"""`eqxlm train` options: gradient accumulation, bfloat16 mixed precision with remat, a fresh
model from a config.json, and the core package working without the `train` extra."""

import json
import subprocess
import sys

import grain  # noqa: E402,F401
import numpy as np
import orbax.checkpoint  # noqa: E402,F401  (in the test extra: a missing install fails, never skips)
import pytest
from _train_fixtures import REPO, corpus, tiny_llama

import eqxlm
from eqxlm.train import TrainConfig, complete_steps, run_training


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    return {"model": tiny_llama(root / "model"), "data": corpus(root / "docs.txt"), "root": root}


def _config(files, out, **kw):
    base = dict(model=str(files["model"]), data=(str(files["data"]),), output_dir=str(out), seq_len=32, batch_size=4,
                steps=2, save_every=2, learning_rate=3e-3, progress=False, plot=False, eval_fraction=0.0)  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def float32_run(files):
    return run_training(_config(files, files["root"] / "f32", steps=3))  # step 1 is warm-up at rate 0: two real updates


def _update(run, files) -> np.ndarray:
    """Every parameter's change over the run, as one vector."""
    start, end = (eqxlm.state_dict(eqxlm.from_pretrained(p)) for p in (files["model"], run.export_dir))
    return np.concatenate([(np.asarray(end[k]) - np.asarray(start[k])).ravel() for k in sorted(start)])


def test_gradient_accumulation_equals_one_big_batch(files, float32_run, tmp_path):
    """The loss, the gradient's norm (before clipping) and the update all match: Adam's
    scale invariance and clipping would hide a gradient of the wrong scale from the loss."""
    four = run_training(_config(files, tmp_path / "four", steps=3, grad_accum=4))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in four.history], [r[key] for r in float32_run.history], rtol=1e-6)
    one, accumulated = _update(float32_run, files), _update(four, files)
    assert np.linalg.norm(accumulated - one) <= 1e-4 * np.linalg.norm(one)


def test_mixed_precision_and_remat_keep_float32_master_weights(files, float32_run, tmp_path):
    run = run_training(_config(files, tmp_path / "bf16", steps=3, mixed_precision=True, remat=True))
    # bfloat16 compute (8-bit mantissa): the loss agrees with float32's to bfloat16 precision.
    np.testing.assert_allclose([r["loss"] for r in run.history], [r["loss"] for r in float32_run.history], rtol=1e-2)
    assert [r["loss"] for r in run.history] != [r["loss"] for r in float32_run.history]  # it did compute in bfloat16
    exported = eqxlm.from_pretrained(run.export_dir)
    assert {str(v.dtype) for v in eqxlm.state_dict(exported).values()} == {"float32"}
    assert json.loads((run.export_dir / "config.json").read_text())["dtype"] == "float32"


def test_fresh_model_from_a_config_json_into_a_relative_folder(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = run_training(_config(files, "runs/fresh", model=None, model_config=str(files["model"] / "config.json"),
                        tokenizer=str(files["model"] / "tokenizer.json"), seed=3))  # fmt: skip
    model = eqxlm.from_pretrained(run.export_dir)
    assert model.config.hidden_size == 32 and (run.export_dir / "tokenizer.json").exists()
    assert np.isfinite(run.history[-1]["loss"])
    assert run.export_dir == tmp_path / "runs" / "fresh" / "export"
    assert complete_steps(tmp_path / "runs" / "fresh" / "checkpoints") == [2]


def test_core_package_and_help_work_without_the_train_extra(files, tmp_path):
    code = (
        "import sys; sys.modules['grain'] = None; sys.modules['orbax'] = None; sys.modules['orbax.checkpoint'] = None\n"
        "import eqxlm, eqxlm.cli\n"
        f"sys.exit(eqxlm.cli.main(['train', '--data', {str(files['data'])!r}, '--output-dir', {str(tmp_path / 'x')!r}]))"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "needs the train extra (pip install 'eqxlm[train]')" in run.stderr
    assert not (tmp_path / "x").exists()
