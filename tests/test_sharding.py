"""Sharded forward, generation and training on 8 simulated CPU devices equal one device.

The devices must exist before JAX starts, so the work runs in a fresh process
(`tests/sharding_worker.py`, with XLA_FLAGS=--xla_force_host_platform_device_count=8) and this
module checks what it measured. Each compile on 8 devices is slow on 2 cores, so these are `slow`
checks that CI runs in its second step (`-m "slow and ci"`): every architecture and every mesh
once (llama on all three meshes, the other architectures on one each); `test_rest_of_the_matrix`
(plain `slow`) runs the rest of the 4 x 3 matrix."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ALL = [f"{a}-{m}" for a in ("llama", "mistral", "bloom", "llama-scanned") for m in ("data8", "data2_tensor4", "fsdp4_tensor2")]
CASES = ["llama-data8", "llama-data2_tensor4", "llama-fsdp4_tensor2", "mistral-data2_tensor4", "bloom-fsdp4_tensor2"]
CASES += ["llama-scanned-fsdp4_tensor2"]
REST = [c for c in ALL if c not in CASES]


def _run_worker(out, cases):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    # The worker imports this checkout's eqxlm, not whichever one is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    worker = Path(__file__).with_name("sharding_worker.py")
    run = subprocess.run([sys.executable, str(worker), str(out), *cases], env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    return _run_worker(tmp_path_factory.mktemp("sharding") / "results.json", CASES)


def _check(r, case):
    assert r["specs_ok"], "from_pretrained(mesh=...) placed a parameter differently from the rules"
    assert r["placed_ok"] and r["still_sharded"]
    assert r["logits_max_diff"] <= 1e-5, r  # float32, logits of magnitude ~r["logits_scale"]
    assert r["tokens_equal"], "greedy generation differs"
    assert r["loss_diff"] <= 1e-5 and r["param_max_diff"] <= 1e-6, r  # one SGD step
    if "tensor" in case:
        assert "tensor" in r["tensor_sharded_q"]
    assert "MiB of parameters per device" in r["memory"]


# Compiling for 8 devices on 2 cores takes minutes: these run in CI's second step (`slow and ci`).
CI = [pytest.mark.slow, pytest.mark.ci]


@pytest.mark.parametrize("case", [pytest.param(c, marks=CI) for c in CASES])
def test_sharded_matches_single_device(measured, case):
    _check(measured[case], case)


@pytest.mark.slow
def test_rest_of_the_matrix(tmp_path):
    results = _run_worker(tmp_path / "results.json", REST)
    for case in REST:
        _check(results[case], case)


@pytest.mark.slow
@pytest.mark.ci
def test_indivisible_rule_names_parameter_dimension_and_axis(measured):
    message = measured["indivisible_error"]
    assert message is not None
    assert "q_proj.weight" in message and "dimension 0" in message and "'tensor'" in message


@pytest.mark.slow
@pytest.mark.ci
def test_memory_estimate_on_an_abstract_model_matches_the_placed_shards(measured):
    m = measured["memory_estimate"]
    assert m["total"] == m["params_bytes"]
    assert m["estimate"] == m["measured_max"]
