"""Runs `eqxlm train` (tests/test_train.py) and SIGKILLs it at a chosen moment:

    python tests/train_driver.py kill-before-step 7 4 -- ARGS...   # before step 7, once checkpoint 4 is complete
    python tests/train_driver.py kill-in-finalize 8 -- ARGS...     # while Orbax finalizes checkpoint 8
    python tests/train_driver.py run -- ARGS...                    # no kill

The kill is a real SIGKILL of this process (no cleanup, no atexit, background writes cut off)."""

import os
import signal
import sys
import time
from pathlib import Path

import eqxlm.train._loop as loop
from eqxlm.cli import main


def kill():
    os.kill(os.getpid(), signal.SIGKILL)


def kill_before_step(step: int, checkpoint: int, output_dir: Path) -> None:
    make_step = loop.make_step

    def patched(*args, **kwargs):
        real = make_step(*args, **kwargs)
        calls = [0]

        def counting(*a):
            calls[0] += 1
            if calls[0] == step:  # step `step` is about to run; wait for the earlier checkpoint
                deadline = time.time() + 120
                while checkpoint not in loop.complete_steps(output_dir / "checkpoints") and time.time() < deadline:
                    time.sleep(0.01)
                kill()
            return real(*a)

        return counting

    loop.make_step = patched


def kill_in_finalize(step: int) -> None:
    from orbax.checkpoint._src.path import atomicity

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def patched(self):
        if self._final_path.name == str(step):
            kill()
        return await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = patched


if __name__ == "__main__":
    split = sys.argv.index("--")
    mode, params, args = sys.argv[1], sys.argv[2:split], sys.argv[split + 1 :]
    output_dir = Path(args[args.index("--output-dir") + 1])
    if mode == "kill-before-step":
        kill_before_step(int(params[0]), int(params[1]), output_dir)
    elif mode == "kill-in-finalize":
        kill_in_finalize(int(params[0]))
    sys.exit(main(["train", *args]))
