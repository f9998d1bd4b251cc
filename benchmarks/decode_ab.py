"""Decode at batch 1 and 8 of one checkout's eqxlm (this one, or another given by path: an
A/B of two commits in turns), Mistral-0.5B shape of `bench.py`, random weights, `generate`
after a 128-token prompt, tokens/s from 64 minus 33 new tokens (as `bench.py`), median of 3.

    python benchmarks/decode_ab.py DTYPE [CHECKOUT]     # ~1.5 min on 2 cores
    git worktree add /tmp/old COMMIT && python benchmarks/decode_ab.py bfloat16 /tmp/old

No asserts: this measures.
"""

import sys
from pathlib import Path

ROOT = Path(sys.argv[2]).resolve() if len(sys.argv) > 2 else Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench.py of this checkout
sys.path.insert(1, str(ROOT))  # eqxlm of the checkout measured

import bench  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import eqxlm  # noqa: E402


def main(dtype):
    model = eqxlm.DecoderLM(bench.SHAPES["mistral-0.5b"], key=jax.random.key(0), dtype=jnp.dtype(dtype))
    for batch in (1, 8):
        ids = np.random.default_rng(1).integers(0, 32000, (batch, 128)).astype(np.int32)

        def gen(n, ids=ids):
            return eqxlm.generate(model, ids, max_new_tokens=n, eos_token_id=[]).block_until_ready()

        gen(bench.LONG), gen(bench.SHORT)  # compile both
        rate = bench.decode_rate(batch, bench.timed(lambda: gen(bench.LONG), 3), bench.timed(lambda: gen(bench.SHORT), 3))
        print(f"{ROOT.name} {dtype} decode batch {batch}: {rate.cell(' tok/s')}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
