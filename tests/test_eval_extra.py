"""eqxlm without the `eval` extra: the package imports, and `eqxlm eval` says what to install."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_package_does_not_import_lm_eval_or_jinja():
    out = run(
        "import sys, eqxlm, eqxlm.cli, eqxlm.chat; print(sorted(m for m in ('lm_eval', 'jinja2', 'torch') if m in sys.modules))"
    )
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_eval_without_lm_eval_names_the_extra():
    # lm_eval made unimportable, as on an install without the extra
    out = run(
        "import sys; sys.modules['lm_eval'] = None; from eqxlm.cli import main; "
        "sys.exit(main(['eval', 'eqxlm/default', '--tasks', 'x']))"
    )
    assert out.returncode == 2 and "pip install 'eqxlm[eval]'" in out.stderr and "Traceback" not in out.stderr
