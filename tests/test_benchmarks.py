"""The benchmark script keeps working (`--quick`, one tiny shape). Timings are not asserted."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.ci
def test_quick_benchmark_prints_its_table(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench.py"),
            "--quick",
            "--models",
            "mistral-tiny",
            "--cache",
            str(tmp_path),
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for needle in ("roofline:", "| prefill 16 |", "| decode batch 8 |", "compile decode loop", "from_pretrained, fresh process"):
        assert needle in out.stdout
    assert (tmp_path / "r.json").exists()
