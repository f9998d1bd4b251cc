"""Mixture-of-experts benchmark: a Mixtral-shaped model of about 0.5B parameters (8 experts,
top-2) against transformers in the same run, the dense (Mistral) model with the same active
parameter count, and eqxlm's grouped dispatch against every expert on every token.

    python benchmarks/moe.py [--reps 3] [--decode-batches 1,8] [--no-torch]
    python benchmarks/moe.py --alternate 9    # batch-1 decode, mixture and dense in turns

A full run takes about 20 minutes on 2 cores. `--alternate N` measures the one target figure,
batch-1 decode of the mixture over the dense model of equal active parameters, by timing the two
in turns in one process (N rounds), so a slow spell of the machine hits both; it prints the
ratio of medians and the spread of the per-round ratios.

Random weights (written once to benchmarks/.cache). Figures are medians with [min-max] and
the run count; the machine may be shared, so read them as rough. No asserts: this measures.
"""

import argparse
import copy
import dataclasses
import platform
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # this checkout's eqxlm

import bench  # noqa: E402

import eqxlm  # noqa: E402
from eqxlm.models.mixtral import MixtralConfig  # noqa: E402
from eqxlm.nn import SparseMoE  # noqa: E402
from eqxlm.params import parameter_count  # noqa: E402

SHAPE = dict(
    vocab_size=32000, hidden_size=1024, num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=4,
    max_position_embeddings=2048, tie_word_embeddings=False,
)  # fmt: skip
MOE = MixtralConfig(**SHAPE, intermediate_size=1536, num_local_experts=8, num_experts_per_tok=2)
DENSE = eqxlm.MistralConfig(**SHAPE, intermediate_size=2 * 1536, sliding_window=None)  # = top-2 experts' width


def checkpoint(name, config, cache):
    folder = cache / name
    if not (folder / "config.json").exists():
        print(f"  writing random weights for {name} to {folder} ...", flush=True)
        eqxlm.save_pretrained(eqxlm.DecoderLM(config, key=jax.random.key(0)), folder)
    return folder


def with_dispatch(model, dispatch):
    """`model` with every `SparseMoE` forced onto one dispatch path."""

    def swap(m):
        if isinstance(m, SparseMoE):
            m = copy.copy(m)
            object.__setattr__(m, "dispatch", dispatch)
        return m

    return jax.tree.map(swap, model, is_leaf=lambda x: isinstance(x, SparseMoE))


def active_count(config, model):
    total = parameter_count(model)
    if not isinstance(config, MixtralConfig):
        return total, total
    per_expert = 3 * config.hidden_size * config.intermediate_size
    idle = (config.num_local_experts - config.num_experts_per_tok) * per_expert * config.num_hidden_layers
    return total, total - idle


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run of the script (seconds)")
    parser.add_argument("--decode-batches", default="1,8", help="comma-separated decode batch sizes (default 1,8)")
    parser.add_argument("--alternate", type=int, default=0, help="rounds of batch-1 decode, mixture and dense in turns")
    args = parser.parse_args(argv)
    moe_config, dense_config = MOE, DENSE
    if args.alternate:
        return alternate(args.alternate, args.cache)
    if args.tiny:
        small = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        moe_config = dataclasses.replace(MOE, **small, intermediate_size=96)
        dense_config = dataclasses.replace(DENSE, **small, intermediate_size=192)
    print(f"# eqxlm mixture-of-experts benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, jax {jax.__version__}")
    rows = {}
    for name, config in (("mixtral-0.5b", moe_config), ("dense-equal-active", dense_config)):
        folder = checkpoint(name + ("-tiny" if args.tiny else ""), config, args.cache)
        model = eqxlm.from_pretrained(folder)
        total, active = active_count(config, model)
        print(f"\n## {name}: {total / 1e6:.1f}M parameters, {active / 1e6:.1f}M active per token", flush=True)
        two = dataclasses.replace(config, num_hidden_layers=2)
        batches = [int(b) for b in args.decode_batches.split(",")]
        res, _ = bench.bench_eqxlm(folder, "float32", args.reps, [512], batches, two)
        if name == "mixtral-0.5b":
            ids = jnp.asarray(np.random.default_rng(5).integers(0, config.vocab_size, 512), jnp.int32)
            forward = eqx.filter_jit(lambda m, i: m(i).logits)
            for path in ("grouped", "dense"):
                forced = with_dispatch(model, path)
                forward(forced, ids).block_until_ready()
                res[f"prefill 512, {path} dispatch"] = bench.Stat(
                    [512 / t for t in bench.timed(lambda f=forced: forward(f, ids).block_until_ready(), args.reps)]
                )
        skip_torch = args.no_torch or name != "mixtral-0.5b"
        theirs = {} if skip_torch else bench.bench_torch(folder, "float32", args.reps, [512], batches)
        print("| figure | eqxlm | transformers | eqxlm / transformers |\n|---|---|---|---|")
        for key, stat in res.items():
            other = theirs.get(key)
            ratio = f"{stat.median / other.median:.2f}x" if other is not None and "(s)" not in key else ""
            print(f"| {key} | {stat.cell()} | {other.cell() if other else ''} | {ratio} |", flush=True)
        rows[name] = res
    moe, dense = rows["mixtral-0.5b"]["decode batch 1"].median, rows["dense-equal-active"]["decode batch 1"].median
    grouped, every = (rows["mixtral-0.5b"][f"prefill 512, {p} dispatch"].median for p in ("grouped", "dense"))
    print(f"\ndecode batch 1: mixture / dense of equal active parameters = {moe / dense:.2f}x (target >= 0.8x)")
    print(f"prefill 512: grouped / every-expert dispatch = {grouped / every:.2f}x")


def alternate(rounds, cache):
    """Batch-1 decode tokens/s of the mixture and the dense model, timed in turns."""
    import statistics

    pairs = (("mixtral-0.5b", MOE), ("dense-equal-active", DENSE))
    models = {name: eqxlm.from_pretrained(checkpoint(name, c, cache)) for name, c in pairs}
    ids = np.random.default_rng(1).integers(0, MOE.vocab_size, (1, 128)).astype(np.int32)

    def run(model, n):
        return lambda: eqxlm.generate(model, ids, max_new_tokens=n, eos_token_id=[]).block_until_ready()

    for model in models.values():  # compile
        run(model, bench.LONG)()
    rates = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            long, short = bench.timed(run(model, bench.LONG), 1), bench.timed(run(model, bench.SHORT), 1)
            rates[name].append(bench.decode_rate(1, long, short).median)
    print(f"# batch-1 decode, {rounds} rounds in turns, {time.strftime('%Y-%m-%d %H:%M')}")
    for name, r in rates.items():
        print(f"{name}: {bench.Stat(r).cell()}")
    ratios = [a / b for a, b in zip(*rates.values(), strict=True)]
    moe, dense = (statistics.median(r) for r in rates.values())
    print(f"mixture / dense = {moe / dense:.2f}x (per-round ratios {bench.Stat(ratios).cell()}; target >= 0.8x)")


if __name__ == "__main__":
    main()
