"""Long-context prefill: peak memory and speed of one forward over 1k-8k tokens on the
Mistral-0.5B shape of `bench.py` (window 4096), with eqxlm's query blocks (the default:
`eqxlm.nn._attention.QUERY_CHUNK = 1024`) and without them, and transformers (sdpa) on the
same random weights. Each figure is taken in a fresh process (peak RSS is per process).

    python benchmarks/long_context.py [--lengths 1024,2048,4096,8192] [--reps 2] [--torch]

Prints peak RSS above the process's RSS before the forward (GiB) and tokens/s (median of
`--reps` after one compiling run; `--reps 0`: memory only). No asserts: this measures.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def _rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _current_rss_gib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def child(impl, length, reps, chunk, folder):
    import numpy as np

    ids = np.random.default_rng(0).integers(0, 32000, length)
    if impl == "torch":
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count() or 1)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        x = torch.tensor(ids)[None]
        base = _current_rss_gib()

        def run():
            with torch.inference_mode():
                return model(x, logits_to_keep=1).logits[0, -1].float().numpy()

    else:
        import equinox as eqx
        import jax
        import jax.numpy as jnp

        sys.path.insert(0, str(HERE.parent))
        import eqxlm
        from eqxlm.nn import _attention

        _attention.QUERY_CHUNK = chunk
        model = eqxlm.from_pretrained(folder)
        x = jnp.asarray(ids, jnp.int32)
        forward = eqx.filter_jit(lambda m, i: m(i).logits[-1])
        base = _current_rss_gib()

        def run():
            return jax.block_until_ready(forward(model, x))

    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"peak_gib": _rss_gib() - base, "tok_s": [length / t for t in times]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--torch", action="store_true", help="also transformers (sdpa)")
    parser.add_argument("--no-blocks-up-to", type=int, default=4096, help="without query blocks only up to this length")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = HERE / ".cache" / "mistral-0.5b-long"
    if args.child:
        impl, length, chunk, reps = args.child
        print(json.dumps(child(impl, int(length), int(reps), int(chunk), folder)))
        return
    if not (folder / "config.json").exists():
        import jax

        sys.path.insert(0, str(HERE.parent))
        import bench

        import eqxlm

        eqxlm.save_pretrained(eqxlm.DecoderLM(bench.SHAPES["mistral-0.5b"], key=jax.random.key(0)), folder)
    print(f"# long-context prefill, Mistral-0.5B shape (window 4096), float32, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| tokens | implementation | peak RSS above baseline (GiB) | tokens/s |\n|---|---|---|---|")
    for length in (int(n) for n in args.lengths.split(",")):
        runs = [("eqxlm, query blocks of 1024", "eqxlm", 1024)]
        if length <= args.no_blocks_up_to:
            runs.append(("eqxlm, one block", "eqxlm", 10**9))
        if args.torch:
            runs.append(("transformers (sdpa)", "torch", 0))
        for label, impl, chunk in runs:
            cmd = [sys.executable, __file__, "--child", impl, str(length), str(chunk), str(args.reps)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(f"| {length} | {label} | failed: {done.stderr.strip().splitlines()[-1][:120]} | |", flush=True)
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rates = r["tok_s"]
            speed = f"{statistics.median(rates):.1f} [{min(rates):.1f}-{max(rates):.1f}] n={len(rates)}" if rates else "not timed"
            print(f"| {length} | {label} | {r['peak_gib']:.2f} | {speed} |", flush=True)
    print(f"\nload average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
