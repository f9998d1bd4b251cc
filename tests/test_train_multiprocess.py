"""`eqxlm train` as 2 processes x 4 CPU devices (jax.distributed over localhost, gloo
collectives) against the same run as 1 process x 8 devices.

- Data parallel (`data=8`) with `--fixed-order-reductions`: every training and held-out
  loss, every gradient norm and the exported model are bitwise equal.
- Every axis (`data=2,fsdp=2,tensor=2`, parameters, optimiser state and batches split across
  the two processes), XLA's own all-reduces: losses within 1e-5; the exported weights differ
  by float32 rounding only (gloo's ring all-reduce adds partial sums in another order than
  XLA's in-process one), checked at 1e-6 absolute on weights of magnitude ~0.5.

Each process writes its own checkpoint shards and data-loader state. Marked slow (~4 minutes on
2 cores): `python -m pytest -m slow tests/test_train_multiprocess.py`."""

import socket

import grain  # noqa: E402,F401
import numpy as np
import orbax.checkpoint  # noqa: E402,F401  (in the test extra: a missing install fails, never skips)
import pytest
from _train_fixtures import corpus, metrics, run_train, tiny_llama
from safetensors.numpy import load_file


def _popen(spec):
    import subprocess

    (command,), kwargs = spec
    return subprocess.Popen(command, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize(
    "mesh, bitwise",
    [("data=8 --fixed-order-reductions", True), ("data=2,fsdp=2,tensor=2", False)],
    ids=["dp-fixed", "dp-fsdp-tp"],
)
def test_two_processes_equal_one_process(tmp_path, mesh, bitwise):
    model, data = tiny_llama(tmp_path / "model"), corpus(tmp_path / "docs.txt")
    args = ["--model", str(model), "--data", str(data), "--steps", "6", "--batch-size", "8", "--seq-len", "32",
            "--mesh", *mesh.split(), "--eval-every", "3", "--save-every", "3", "--learning-rate", "3e-3",
            "--no-progress", "--no-plot"]  # fmt: skip
    single = run_train([*args, "--output-dir", str(tmp_path / "one")], devices=8)
    assert single.returncode == 0, single.stderr[-3000:]

    port = _free_port()
    multi = tmp_path / "two"
    procs = [
        _popen(
            run_train.popen_args(
                [
                    *args,
                    "--output-dir",
                    str(multi),
                    "--coordinator-address",
                    f"127.0.0.1:{port}",
                    "--num-processes",
                    "2",
                    "--process-id",
                    str(i),
                ],  # fmt: skip
                devices=4,
            )
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]

    one, two = metrics(tmp_path / "one"), metrics(multi)
    assert [(r["step"], sorted(r)) for r in one] == [(r["step"], sorted(r)) for r in two]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "eval_loss", "grad_norm"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5, (a, b)
    exported = [(d / "export" / "model.safetensors").read_bytes() for d in (tmp_path / "one", multi)]
    if bitwise:
        exact = ("loss", "grad_norm", "eval_loss", "eval_tokens")  # training and held-out alike
        assert [(r["step"], *map(r.get, exact)) for r in one] == [(r["step"], *map(r.get, exact)) for r in two]
        assert exported[0] == exported[1]
    else:
        a, b = (load_file(d / "export" / "model.safetensors") for d in (tmp_path / "one", multi))
        assert a.keys() == b.keys()
        assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6
    # Each process wrote its own shards of the sharded state, and its own data-loader position.
    step = multi / "checkpoints" / "6"
    assert {p.name for p in (step / "state").glob("ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}
    assert {p.name for p in (step / "data").glob("process_*")} == {"process_0-of-2.json", "process_1-of-2.json"}
