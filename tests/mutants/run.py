"""Run every planted bug (`tests/mutants/mutants.py`) against its covering tests.

    python tests/mutants/run.py              # all mutants, then the kill table
    python tests/mutants/run.py --only ID... # some of them
    python tests/mutants/run.py --check      # only check that every `find` occurs exactly once

The repository (tracked and untracked, not ignored files) is copied once into a temporary
folder; each mutant is applied there, its tests run (`pytest -x`, from that copy, so the
mutated `eqxlm` is the one imported), and the file is restored. A mutant is **killed** when
pytest reports a failing test (exit status 1), **survived** when its tests pass, and an
**error** otherwise (no tests collected, a bad spec, a timeout). Exit status 0 only when
every mutant is killed.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutants import MUTANTS  # noqa: E402


def _copy_repo(dest: Path) -> None:
    files = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def check(mutants) -> list[str]:
    problems = []
    for m in mutants:
        text = (REPO / m["file"]).read_text()
        n = text.count(m["find"])
        if n != 1:
            problems.append(f"{m['id']}: `find` occurs {n} times in {m['file']}")
        if m["find"] == m["replace"]:
            problems.append(f"{m['id']}: replacement equals the original")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="mutant ids to run")
    parser.add_argument("--check", action="store_true", help="only check the specs")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if not args.only or m["id"] in args.only]
    problems = check(mutants)
    if problems or args.check:
        print("\n".join(problems) or f"{len(mutants)} mutants, every `find` occurs once.")
        return 1 if problems else 0
    rows = []
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "EQXLM_QUICK": "1"}
    with tempfile.TemporaryDirectory(prefix="eqxlm-mutants-") as tmp:
        work = Path(tmp)
        _copy_repo(work)
        for m in mutants:
            target = work / m["file"]
            original = target.read_text()
            target.write_text(original.replace(m["find"], m["replace"]))
            start = time.time()
            try:
                run = subprocess.run(
                    # one process (`-n 0`): under xdist, `-x` ends a failing run as "interrupted" (exit 2)
                    [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", *m["tests"]],
                    cwd=work,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=args.timeout,
                )
                status = {0: "SURVIVED", 1: "killed"}.get(run.returncode, f"error (pytest exit {run.returncode})")
                failed = [line.split(" ")[1] for line in run.stdout.splitlines() if line.startswith("FAILED ")]
                by = failed[0].split("::")[-1] if failed else ""
            except subprocess.TimeoutExpired:
                status, by = "error (timeout)", ""
            finally:
                target.write_text(original)
            rows.append((m["id"], m["file"], status, f"{time.time() - start:.0f}s", by))
            print(f"{m['id']:<48} {status:<10} {rows[-1][3]:>5}  {by}", flush=True)
    print("\n| mutant | file | result | time | first failing test |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    killed = sum(r[2] == "killed" for r in rows)
    print(f"\n{killed} of {len(rows)} killed.")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
