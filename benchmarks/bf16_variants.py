"""bfloat16 on XLA:CPU, the variants of `NOTES.md` ("bfloat16 on XLA:CPU"): batch-1 decode
(`eqxlm.generate`, 64 minus 33 new tokens after a 128-token prompt, as `bench.py`) and prefill
512 of the Mistral-0.5B shape of `bench.py`, random weights, with every projection's product
patched (`eqxlm.nn._linear.affine`, which `eqxlm.nn.project` and `linear` call for a plain
`eqx.nn.Linear`).

    [XLA_FLAGS=...] python benchmarks/bf16_variants.py DTYPE VARIANT

VARIANT: as-is (eqxlm as shipped: since 2026-11-29 float32 accumulation, rounded once after
the bias), plain (`x @ w.T + b` in the storage dtype: eqxlm before), f32acc (as-is written
out: `preferred_element_type=float32`), upcast (weights converted to float32 inside the step),
reduce (one token as a float32 multiply-reduce; prefill as upcast). One process per variant
(XLA reads its flags once). Prints one line. No asserts: this measures.
"""

import statistics
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's eqxlm

import bench  # noqa: E402

import eqxlm  # noqa: E402

F32 = jnp.float32
MODE = {"decode": True}


def patched_affine(variant):
    def affine(layer, x):  # x: one token or a sequence
        w, b = layer.weight, layer.bias
        if variant == "f32acc":
            y = jnp.matmul(x, w.T, preferred_element_type=F32)
            return (y if b is None else y + b.astype(F32)).astype(x.dtype)
        if variant in ("dg", "hybrid"):
            if variant == "hybrid" and (x.ndim == 1 or x.shape[0] == 1):
                y = jnp.matmul(x, w.T, preferred_element_type=F32)
            else:
                y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=F32)
            return (y if b is None else y + b.astype(F32)).astype(x.dtype)
        if variant == "upcast" or (variant == "reduce" and not MODE["decode"]):
            y = (x.astype(F32) @ w.astype(F32).T).astype(x.dtype)
        elif variant == "reduce":
            y = (w.astype(F32) * x.astype(F32)[..., None, :]).sum(-1).astype(x.dtype)
        else:
            y = x @ w.T
        return y if b is None else y + b

    return affine


def main(dtype, variant):
    if variant != "as-is":
        eqxlm.nn._linear.affine = patched_affine(variant)
    model = eqxlm.DecoderLM(bench.SHAPES["mistral-0.5b"], key=jax.random.key(0), dtype=jnp.dtype(dtype))
    gids = np.random.default_rng(1).integers(0, 32000, (1, 128)).astype(np.int32)

    def gen(n):
        return eqxlm.generate(model, gids, max_new_tokens=n, eos_token_id=[]).block_until_ready()

    compile_decode = bench.timed(lambda: gen(bench.LONG), 1)[0]
    rate = bench.decode_rate(1, bench.timed(lambda: gen(bench.LONG), 2), bench.timed(lambda: gen(bench.SHORT), 2))
    ms = [1e3 / r for r in rate.runs]
    MODE["decode"] = False
    fwd = eqx.filter_jit(lambda m, ids: m(ids).logits)
    ids = jnp.asarray(np.arange(512) % 32000, jnp.int32)
    compile_prefill = bench.timed(lambda: fwd(model, ids).block_until_ready(), 1)[0]
    prefill = [512 / t for t in bench.timed(lambda: fwd(model, ids).block_until_ready(), 3)]
    first = np.asarray(fwd(model, jnp.asarray(gids[0]))[0, :3], np.float32)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    m = statistics.median(ms)
    print(
        f"{dtype:9} {variant:7} decode batch 1 {m:.1f} ms/token [{min(ms):.1f}-{max(ms):.1f}] = {1e3 / m:.1f} tok/s, "
        f"{nbytes / 1e9 / (m / 1e3):.1f} GB/s | prefill 512 {statistics.median(prefill):.0f} tok/s "
        f"[{min(prefill):.0f}-{max(prefill):.0f}] | first calls {compile_decode:.1f} + {compile_prefill:.1f} s | "
        f"logits[0, :3] {first}"
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
