"""One projection in the forms XLA:CPU runs differently: the 1024 -> 3584 projection of
`bench.py`'s Mistral-0.5B shape, float32 and bfloat16, as `x @ W.T`, as a `dot_general`
contracting both last axes, weight-first, per token under `jax.vmap` (how a model sees a
batch), all accumulating in float32 (`preferred_element_type`). Why `eqxlm.nn._linear.affine`
picks the form it does (NOTES.md, bfloat16 on XLA:CPU).

    python benchmarks/matmul_forms.py     # ~1 min on 2 cores

Prints milliseconds (median of 10-40 calls) per form. No asserts: this measures.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
DIMS = (((1,), (1,)), ((), ()))
FORMS = {
    "x @ W.T": lambda x, w: jnp.matmul(x, w.T, preferred_element_type=F32).astype(x.dtype),
    "dot_general(x, W)": lambda x, w: jax.lax.dot_general(x, w, DIMS, preferred_element_type=F32).astype(x.dtype),
    "(W @ x.T).T": lambda x, w: jnp.matmul(w, x.T, preferred_element_type=F32).T.astype(x.dtype),
    "x @ W.T, no float32 accumulation": lambda x, w: x @ w.T,
}


def ms(fn, *args, n):
    fn(*args).block_until_ready()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return f"{np.median(times) * 1e3:.2f}"


def main():
    rng = np.random.default_rng(0)
    print(f"# jax {jax.__version__}; weight 3584 x 1024; ms per call (median)\n")
    print("| dtype | tokens | " + " | ".join(FORMS) + " |\n|---|---|" + "---|" * len(FORMS))
    for dtype in (jnp.float32, jnp.bfloat16):
        w = jnp.asarray(rng.normal(size=(3584, 1024)) * 0.02, dtype)
        for label, shape, vmapped in (
            ("512 (one sequence)", (512, 1024), False),
            ("1 per example, batch 1 (vmap)", (1, 1, 1024), True),
            ("1 per example, batch 8 (vmap)", (8, 1, 1024), True),
        ):
            x = jnp.asarray(rng.normal(size=shape), dtype)
            n = 10 if shape[0] == 512 else 40
            cells = []
            for form in FORMS.values():
                fn = jax.jit(jax.vmap(form, in_axes=(0, None)) if vmapped else form)
                cells.append(ms(fn, x, w, n=n))
            print(f"| {jnp.dtype(dtype).name} | {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
