"""`eqxlm train` through its Python API: export, metrics, trainable filter, accumulation, and
bad input (a clear error before any compute, nothing overwritten). Resume after SIGKILL is in
test_train_resume.py, several processes in test_train_multiprocess.py.

Runs are tiny (a 2-layer Llama of width 32, the default model's tokenizer, 40 documents of
CPython's pydoc text), in fresh processes where a kill or several devices are involved."""

import json
import shutil

import equinox as eqx
import grain  # noqa: E402,F401
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint  # noqa: E402,F401  (in the test extra: a missing install fails, never skips)
import pytest
import torch
from _train_fixtures import RecordingBar, corpus, metrics, run_train, snapshot, tiny_llama
from conftest import LOGITS_ATOL

import eqxlm
from eqxlm.train import DataError, TrainConfig, TrainError, run_training
from eqxlm.train import _loop as loop

ARGS = ["--seq-len", "32", "--batch-size", "4", "--learning-rate", "3e-3", "--eval-every", "5", "--no-progress", "--no-plot"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {"model": tiny_llama(root / "model"), "data": corpus(root / "docs.txt"), "root": root}


def _args(files, out, steps=12, save_every=4):
    return ["--model", str(files["model"]), "--data", str(files["data"]), "--output-dir", str(out), "--steps", str(steps),
            "--save-every", str(save_every), *ARGS]  # fmt: skip


def _config(files, out, **kw):
    base = dict(model=str(files["model"]), data=(str(files["data"]),), output_dir=str(out), seq_len=32, batch_size=4,
                steps=2, save_every=1, learning_rate=3e-3, progress=False, plot=False)  # fmt: skip
    return TrainConfig(**{**base, **kw})


# -- the in-process API: export, metrics, trainable filter -------------------------------------------------
@pytest.fixture(scope="module")
def api_run(files):
    out = files["root"] / "api"
    run = run_training(_config(files, out, steps=3, eval_every=2, plot=True))
    return out, run


def test_export_loads_in_transformers_with_the_same_logits(files, api_run):
    from transformers import AutoModelForCausalLM

    out, run = api_run
    assert run.export_dir == out / "export"
    assert (run.export_dir / "tokenizer.json").read_bytes() == (files["model"] / "tokenizer.json").read_bytes()
    ours = eqxlm.from_pretrained(run.export_dir)
    theirs = AutoModelForCausalLM.from_pretrained(run.export_dir, dtype=torch.float32).eval()
    ids = np.arange(1, 20, dtype=np.int32)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(ids[None].astype(np.int64))).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids)).logits), expected, atol=LOGITS_ATOL)
    # The weights moved from the starting checkpoint.
    start = eqxlm.from_pretrained(files["model"])
    assert not np.array_equal(np.asarray(ours.lm_head.weight), np.asarray(start.lm_head.weight))


def test_metrics_plot_and_history(api_run):
    out, run = api_run
    rows = metrics(out)
    assert rows == run.history
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 3]
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in rows if "loss" in r)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "train_config.json").read_text())["steps"] == 3


def test_trainable_filter_freezes_the_rest(files, tmp_path):
    def only_head(model):  # a pytree of bools shaped like the model: train the lm_head only
        spec = jax.tree.map(lambda _: False, model)
        return eqx.tree_at(lambda m: m.lm_head.weight, spec, replace=True)

    start = eqxlm.from_pretrained(files["model"])
    run = run_training(_config(files, tmp_path / "head", steps=2, eval_fraction=0.0), trainable=only_head(start))
    done = eqxlm.from_pretrained(run.export_dir)
    for name, value in eqxlm.state_dict(done).items():
        same = np.array_equal(np.asarray(value), np.asarray(eqxlm.state_dict(start)[name]))
        assert same == (name != "lm_head.weight"), name


def test_progress_bar_shows_each_loss_at_its_own_step(files, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "tqdm", RecordingBar)
    run = run_training(_config(files, tmp_path / "bar", steps=3, progress=True, eval_fraction=0.0, export=False))
    assert RecordingBar.shown == [(r["step"], f"{r['loss']:.4f}") for r in run.history]


# -- bad input: a clear error before any compute, nothing overwritten --------------------------------------
@pytest.fixture
def no_compute(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("training compute started")

    monkeypatch.setattr(loop, "make_step", forbidden)


def _refused(config, error, match, folder=None):
    before = snapshot(folder) if folder is not None and folder.exists() else None
    with pytest.raises(error, match=match):
        run_training(config)
    if before is not None:
        assert snapshot(folder) == before


def test_empty_data_file(files, tmp_path, no_compute):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    _refused(_config(files, tmp_path / "out", data=(str(files["data"]), str(empty))), DataError, f"{empty} is empty")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["missing", "binary", "directory", "bad-json", "no-field"])
def test_unreadable_data_file(files, tmp_path, no_compute, kind):
    path = tmp_path / ("data.jsonl" if "json" in kind or "field" in kind else "data.txt")
    match = {
        "missing": "does not exist",
        "binary": "is not UTF-8 text",
        "directory": "is not a file",
        "bad-json": r"data.jsonl:2: not valid JSON",
        "no-field": r"data.jsonl:1: no 'text' field",
    }[kind]
    if kind == "binary":
        path.write_bytes(b"\xff\xfe\x00binary")
    elif kind == "directory":
        path.mkdir()
    elif kind == "bad-json":
        path.write_text('{"text": "fine"}\n{"text": oops}\n')
    elif kind == "no-field":
        path.write_text('{"body": "the text"}\n')
    _refused(_config(files, tmp_path / "out", data=(str(path),)), DataError, match)
    assert not (tmp_path / "out").exists()


def test_sequence_longer_than_the_model_allows(files, tmp_path, no_compute):
    _refused(
        _config(files, tmp_path / "out", seq_len=129),
        TrainError,
        r"seq_len 129 exceeds the model's max_position_embeddings \(128\)",
    )
    assert not (tmp_path / "out").exists()


def test_batch_the_mesh_cannot_divide(files, tmp_path):
    out = tmp_path / "out"
    run = run_train(["--model", str(files["model"]), "--data", str(files["data"]), "--output-dir", str(out),
                     "--batch-size", "12", "--mesh", "data=8", "--seq-len", "32"], devices=8)  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    assert "12 sequences per micro-batch, which the mesh's batch axes (data=8 = 8 ways) cannot divide" in run.stderr
    assert not out.exists()
    _refused(
        _config(files, out, batch_size=8, grad_accum=3), ValueError, r"batch_size \(8\) must be divisible by grad_accum \(3\)"
    )


def test_new_run_into_a_used_folder(files, api_run, no_compute):
    out, _ = api_run
    _refused(_config(files, out, steps=3, eval_every=2, plot=True), TrainError, "is not empty; pass --resume", out)


def test_resume_with_changed_options(files, api_run, no_compute):
    out, _ = api_run
    changed = _config(files, out, steps=3, eval_every=2, learning_rate=1e-2, resume=True)
    _refused(changed, TrainError, r"(?s)changed options.*learning_rate: saved 0.003, now 0.01", out)


def test_changed_options_are_listed_one_per_line_by_the_command(files, api_run, no_compute, capsys):
    from eqxlm.cli import main

    out, _ = api_run
    args = ["train", "--model", str(files["model"]), "--data", str(files["data"]), "--output-dir", str(out), "--seq-len", "32",
            "--batch-size", "4", "--steps", "4", "--eval-every", "2", "--learning-rate", "1e-2", "--resume",
            "--no-progress"]  # fmt: skip
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"eqxlm: error: cannot resume {out} with changed options (nothing was changed):",
        "  learning_rate: saved 0.003, now 0.01",
        "  steps: saved 3, now 4",
    ]


def test_checkpoint_folder_from_a_different_model(files, api_run, tmp_path, no_compute):
    out, _ = api_run
    other = tiny_llama(tmp_path / "model", hidden=48)  # same path in the saved config, different weights' shapes
    moved = tmp_path / "run"
    shutil.copytree(out, moved)
    saved = json.loads((moved / "train_config.json").read_text())
    saved["model"] = str(other)
    (moved / "train_config.json").write_text(json.dumps(saved))
    config = _config(files, moved, model=str(other), steps=3, eval_every=2, plot=True, resume=True)
    _refused(
        config, TrainError, r"different model \(parameter lm_head.weight: checkpoint \[2048, 32\], model \[2048, 48\]\)", moved
    )
