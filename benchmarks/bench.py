"""eqxlm against transformers (PyTorch), same machine, same run, same random weights.

    python benchmarks/bench.py                 # the full suite (~30 min on 2 cores)
    python benchmarks/bench.py --quick         # small shapes, seconds (the tests run this)
    python benchmarks/bench.py --quant         # batch-1 decode: float32 vs int8 vs int4 (eqxlm.quantize)
    python benchmarks/bench.py --quant-quality # what int8 / int4 cost in quality (quant_quality.py)
    python benchmarks/bench.py --only-load     # from_pretrained seconds and peak RSS, every dtype, sharded too
    python benchmarks/bench.py --layers        # compile time against depth, unrolled vs scanned layers
    python benchmarks/bench.py --train         # training step vs transformers + torch AdamW; remat memory
    python benchmarks/bench.py --long-context  # 2k / 8k prefill memory and speed (long_context.py), 33k decode test

Shapes: a BLOOM-560m-shaped model (vocab 250880, hidden 1024, 24 layers, 16 heads) and a
Mistral-shaped ~0.5B model (vocab 32000, hidden 1024, intermediate 3584, 16 layers, 16 heads,
4 kv heads, window 4096), random weights saved once as safetensors under benchmarks/.cache.

Figures (medians over --reps runs, with min/max): prefill tokens/s at prompt 128 and 512
(batch 1, full logits); decode tokens/s at batch 1 and 8 after a 128-token prompt, excluding
prefill (the difference between generating 64 and 33 tokens, which share one compiled loop);
first-call compile seconds for prefill and for the decode loop, also for a 2-layer model of
the same width; from_pretrained seconds and peak RSS in a fresh process; float32 and bfloat16.
The machine's roofline (matmul GFLOP/s, weight-streaming GB/s) is measured by the same run, and
batch-1 decode is also given as a fraction of bandwidth / bytes-per-token.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqxlm

HERE = Path(__file__).resolve().parent
SHAPES = {
    "mistral-0.5b": eqxlm.MistralConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        sliding_window=4096,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    ),
    "bloom-560m": eqxlm.BloomConfig(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16),
}
#: Load-only rows (`--only-load`): the BLOOM-560m shape again, saved in ~500 MB shards (2.2 GB).
SHARDED_SHAPES = {"bloom-560m-500MB-shards": (SHAPES["bloom-560m"], "500MB")}
QUICK_SHAPES = {
    "mistral-tiny": eqxlm.MistralConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    "bloom-tiny": eqxlm.BloomConfig(vocab_size=512, hidden_size=64, n_layer=4, n_head=4),
}


@dataclasses.dataclass
class Stat:
    runs: list

    @property
    def median(self):
        return statistics.median(self.runs)

    def cell(self, unit=""):
        lo, hi = min(self.runs), max(self.runs)
        return f"{self.median:,.1f}{unit} [{lo:,.1f}-{hi:,.1f}] n={len(self.runs)}"


def timed(fn, reps):
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


LONG, SHORT = 64, 33  # one max_new_tokens bucket (64): the same compiled loop, 31 steps apart


def decode_rate(batch, t_long, t_short):
    """Tokens/s of the LONG - SHORT extra decode steps (prefill cancels out); pairs whose
    difference is not positive (noise on tiny shapes) are dropped."""
    steps = LONG - SHORT
    rates = [batch * steps / (a - c) for a, c in zip(t_long, t_short, strict=True) if a > c]
    return Stat(rates or [float("nan")])


# -- roofline -----------------------------------------------------------------------------
def roofline(reps, quick):
    n = 512 if quick else 2048
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()
    flops = [2 * n**3 / t / 1e9 for t in timed(lambda: mm(a).block_until_ready(), reps + 2)]
    rows = (64 if quick else 256) * 2**20 // (4 * 4096)
    w = jnp.ones((rows, 4096), jnp.float32)
    x = jnp.ones((4096,), jnp.float32)
    mv = jax.jit(lambda w, x: w @ x)
    mv(w, x).block_until_ready()
    bandwidth = [w.nbytes / t / 1e9 for t in timed(lambda: mv(w, x).block_until_ready(), reps + 4)]
    return Stat(flops), Stat(bandwidth)


# -- checkpoints --------------------------------------------------------------------------
def checkpoint(name, config, cache, max_shard_size="2GB"):
    folder = cache / name
    if not (folder / "config.json").exists():
        print(f"  writing random weights for {name} to {folder} ...", flush=True)
        model = eqxlm.DecoderLM(config, key=jax.random.key(0))
        eqxlm.save_pretrained(model, folder, max_shard_size=max_shard_size)
        del model
    return folder


LOAD_CODE = {
    "eqxlm": "import eqxlm, jax.numpy as jnp; t=time.perf_counter(); m=eqxlm.from_pretrained(sys.argv[1], dtype=jnp.{dtype}); "
    "import jax; jax.block_until_ready(m); dt=time.perf_counter()-t",
    "transformers": "import torch, transformers; t=time.perf_counter(); m=transformers.AutoModelForCausalLM.from_pretrained("
    "sys.argv[1], dtype=torch.{dtype}); dt=time.perf_counter()-t",
}
#: After the load: read every weight once (both libraries hand out memory-mapped weights whose
#: pages are only read on first use), then the resident set.
TOUCH_CODE = {
    "eqxlm": "import numpy as np; [np.asarray(x).sum() for x in jax.tree.leaves(m)]",
    "transformers": "[p.sum() for p in m.parameters()]",
}


def load_in_fresh_process(lib, folder, dtype):
    """Seconds of from_pretrained; the process's peak RSS before and after loading; its RSS
    once every weight has been read (GiB)."""
    # Peak RSS from /proc/self/status VmHWM, which belongs to this process image: getrusage's
    # ru_maxrss survives fork+exec on Linux and would report the (large) parent's peak.
    hwm = "int([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    warm = "import jax, eqxlm; jax.numpy.zeros(1).block_until_ready(); " if lib == "eqxlm" else "import torch, transformers; "
    rss = "int([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS')][0])"
    code = (
        f"import sys, time; {warm}base={hwm}; "
        + LOAD_CODE[lib].format(dtype=dtype)
        + f"; peak={hwm}; {TOUCH_CODE[lib]}; print(dt, base, peak, {rss})"
    )
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    seconds, base_kb, peak_kb, touched_kb = out.stdout.split()[-4:]
    return float(seconds), int(base_kb) / 2**20, int(peak_kb) / 2**20, int(touched_kb) / 2**20


# -- eqxlm --------------------------------------------------------------------------------
def bench_eqxlm(folder, dtype, reps, prompts, decode_batches, two_layer_config):
    model = eqxlm.from_pretrained(folder, dtype=dtype)
    vocab = model.config.vocab_size
    res = {}
    forward = eqx.filter_jit(lambda m, ids: m(ids).logits)
    for p in prompts:
        ids = jnp.asarray(np.random.default_rng(p).integers(0, vocab, p), jnp.int32)
        first = timed(lambda: forward(model, ids).block_until_ready(), 1)[0]
        steady = Stat([p / t for t in timed(lambda: forward(model, ids).block_until_ready(), reps)])
        res[f"prefill {p}"] = steady
        res[f"compile prefill {p} (s)"] = Stat([first - p / steady.median])
    for b in decode_batches:
        ids = np.random.default_rng(b).integers(0, vocab, (b, 128)).astype(np.int32)

        def gen(n):
            return lambda: eqxlm.generate(model, ids, max_new_tokens=n, eos_token_id=[]).block_until_ready()

        first = timed(gen(LONG), 1)[0]
        t_long, t_short = timed(gen(LONG), reps), timed(gen(SHORT), reps)
        res[f"decode batch {b}"] = decode_rate(b, t_long, t_short)
        if b == decode_batches[0]:
            res["compile decode loop (s)"] = Stat([first - statistics.median(t_long)])
    # Compile time against depth: the same width with 2 layers.
    small = eqxlm.DecoderLM(two_layer_config, key=jax.random.key(1), dtype=jnp.dtype(dtype))
    ids = jnp.asarray(np.arange(prompts[-1]) % vocab, jnp.int32)
    first = timed(lambda: eqx.filter_jit(lambda m, i: m(i).logits)(small, ids).block_until_ready(), 1)[0]
    steady = statistics.median(timed(lambda: forward(small, ids).block_until_ready(), reps))
    res[f"compile prefill {prompts[-1]}, 2 layers (s)"] = Stat([first - steady])
    gids = np.random.default_rng(0).integers(0, vocab, (decode_batches[0], 128)).astype(np.int32)

    def small_generate():
        eqxlm.generate(small, gids, max_new_tokens=32, eos_token_id=[]).block_until_ready()

    first = timed(small_generate, 1)[0]
    steady = statistics.median(timed(small_generate, reps))
    res["compile decode loop, 2 layers (s)"] = Stat([first - steady])
    nbytes = sum(x.nbytes for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    return res, nbytes


# -- weight-only quantization ------------------------------------------------------------
def bench_quant(reps, quick):
    """Batch-1 decode tok/s (and prefill 128) of the Mistral-0.5B shape (random weights) in
    float32 and quantized with `eqxlm.quantize`: int8, int8 with the head, int4 (group 128).
    The variants are timed in turns, one rep of each before the next, so a slow spell of a
    shared machine hits all of them. Layers are scanned (`eqxlm.scan_layers`), which keeps the
    compiles short, and float32 and int8 are also timed unrolled (the default layout, whose
    float32 decode has no per-step weight copies; "vs float32" is against scanned float32).
    transformers has no row: its CPU weight-only int8 needs torchao or optimum-quanto, neither
    a dependency here."""
    config = QUICK_SHAPES["mistral-tiny"] if quick else SHAPES["mistral-0.5b"]
    unrolled = eqxlm.DecoderLM(config, key=jax.random.key(0))
    model = eqxlm.scan_layers(unrolled)  # scanned: one layer to compile
    group = 32 if quick else 128
    variants = {
        "float32": model,
        "int8": eqxlm.quantize(model, bits=8),
        "int8 + head": eqxlm.quantize(model, bits=8, where=lambda name: True),
        f"int4 g{group}": eqxlm.quantize(model, bits=4, group_size=group),
        "float32, unrolled": unrolled,
        "int8, unrolled": eqxlm.quantize(unrolled, bits=8),
    }
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (1, 128)).astype(np.int32)
    prompt = jnp.asarray(ids[0])
    forward = eqx.filter_jit(lambda m, ids: m(ids).logits)

    def gen(m, n):
        return lambda: eqxlm.generate(m, ids, max_new_tokens=n, eos_token_id=[]).block_until_ready()

    compile_s = {}
    for name, m in variants.items():
        compile_s[name] = timed(gen(m, LONG), 1)[0]
        forward(m, prompt).block_until_ready()
        print(f"  compiled {name}: first generate {compile_s[name]:.1f} s, load {os.getloadavg()[0]:.2f}", flush=True)
    t_long = {n: [] for n in variants}
    t_short = {n: [] for n in variants}
    prefill = {n: [] for n in variants}
    loads = []
    for _ in range(reps):
        loads.append(os.getloadavg()[0])
        for name, m in variants.items():
            t_long[name] += timed(gen(m, LONG), 1)
            t_short[name] += timed(gen(m, SHORT), 1)
            prefill[name] += [128 / t for t in timed(lambda m=m: forward(m, prompt).block_until_ready(), 1)]
            last = f"{t_long[name][-1]:.2f}/{t_short[name][-1]:.2f} s"
            print(f"  round {len(loads)} {name}: {LONG}/{SHORT} tokens {last}", flush=True)
    rows = {}
    for name, m in variants.items():
        nbytes = sum(x.nbytes for x in jax.tree.leaves(eqx.filter(m, eqx.is_array)))
        rows[name] = {
            "decode batch 1": decode_rate(1, t_long[name], t_short[name]),
            "prefill 128": Stat(prefill[name]),
            "weights (GB)": nbytes / 1e9,
            "first generate (s)": compile_s[name],
        }
    return rows, loads


# -- layers: unrolled against scanned ------------------------------------------------------
@contextlib.contextmanager
def compile_seconds():
    """The seconds JAX spends tracing, lowering to StableHLO and compiling with XLA while the
    block runs, from its own `jax.monitoring` events (execution excluded, unlike a first call
    minus a steady one, which on a busy machine mixes in the run's own noise)."""
    events = {
        "/jax/core/compile/jaxpr_trace_duration": "trace",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
        "/jax/core/compile/backend_compile_duration": "xla",
    }
    total = dict.fromkeys(events.values(), 0.0)

    def listener(event, duration, **_):
        if event in events:
            total[events[event]] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield total
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def bench_layers(reps, quick):
    """Compile seconds of a prefill and of `generate` (its prefill and decode loop) at 2 and 24
    layers (quick: 2 and 6), unrolled and scanned (`scan_layers=True`), and batch-1 decode
    tokens/s in both layouts, on a BLOOM-560m-wide model (hidden 1024, 16 heads) with a 32k
    vocabulary, random weights. Compile seconds are JAX's own tracing + lowering + XLA
    compile events (`compile_seconds`), each from a fresh compile."""
    width = dict(vocab_size=512, hidden_size=64, n_head=4) if quick else dict(vocab_size=32000, hidden_size=1024, n_head=16)
    depths = (2, 6) if quick else (2, 24)
    prompt = 32 if quick else 128
    rows = {}
    for depth in depths:
        config = eqxlm.BloomConfig(n_layer=depth, **width)
        for layout in ("unrolled", "scanned"):
            model = eqxlm.DecoderLM(config, key=jax.random.key(0), scan_layers=layout == "scanned")
            ids = jnp.asarray(np.arange(prompt) % config.vocab_size, jnp.int32)
            compiles, loops = [], []
            for _ in range(reps):  # a fresh function each time: every call compiles
                fn = eqx.filter_jit(lambda m, i: m(i).logits)
                with compile_seconds() as spent:
                    fn(model, ids).block_until_ready()
                compiles.append(sum(spent.values()))
            gids = np.asarray(ids[None, :prompt])
            for _ in range(reps):
                jax.clear_caches()  # generate's compiled loop is cached per shape: clear it to compile again
                with compile_seconds() as spent:
                    eqxlm.generate(model, gids, max_new_tokens=LONG, eos_token_id=[]).block_until_ready()
                loops.append(sum(spent.values()))
            t_long = timed(lambda: eqxlm.generate(model, gids, max_new_tokens=LONG, eos_token_id=[]).block_until_ready(), reps)
            t_short = timed(lambda: eqxlm.generate(model, gids, max_new_tokens=SHORT, eos_token_id=[]).block_until_ready(), reps)
            rows[(depth, layout)] = {
                "compile prefill (s)": Stat(compiles),
                "compile generate (s)": Stat(loops),
                "decode batch 1": decode_rate(1, t_long, t_short),
            }
    return depths, rows


# -- training -----------------------------------------------------------------------------
TRAIN_SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                   num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                   tie_word_embeddings=False, rms_norm_eps=1e-5)  # fmt: skip
TRAIN_QUICK = {**TRAIN_SHAPE, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 4}  # fmt: skip


def bench_train(reps, quick):
    """Tokens/s of one optimiser step (forward, backward, gradient clipping, AdamW update) on a
    ~125M-parameter Llama shape (hidden 768, intermediate 2048, 12 layers, 12 heads, 32k
    vocabulary, untied head: 134M parameters), batch 2 x 512 tokens, in float32 and in
    bfloat16 mixed precision (float32 master weights, gradients and AdamW moments).

    eqxlm: the trainer's own step (`eqxlm.train._loop.make_step`, what `eqxlm train` runs) on
    one device. transformers: `LlamaForCausalLM` (sdpa attention) with `torch.optim.AdamW`
    and `clip_grad_norm_`, mixed precision by `torch.autocast("cpu", torch.bfloat16)`.
    The two are timed in turns, one step of each, after two warm-up steps. Also: the
    compiled step's memory at sequence 2048 (batch 1), unrolled and scanned layers, with and
    without remat (XLA's `memory_analysis`: arguments + temporaries)."""
    import torch
    import transformers
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from eqxlm.train._loop import make_step
    from eqxlm.training import make_optimizer

    torch.set_num_threads(os.cpu_count() or 1)
    shape = TRAIN_QUICK if quick else TRAIN_SHAPE
    batch, seq = (2, 64) if quick else (2, 512)
    ids = np.random.default_rng(0).integers(0, shape["vocab_size"], (batch, seq)).astype(np.int32)
    mesh = jax.make_mesh((1,), ("data",))
    replicated = NamedSharding(mesh, P())

    def eqxlm_step(compute_dtype, remat=False, scanned=False):
        model = eqxlm.DecoderLM(eqxlm.LlamaConfig(**shape), key=jax.random.key(0), scan_layers=scanned)
        params, static = eqx.partition(model, eqx.is_array)
        optimizer = make_optimizer(1e-4, total_steps=1000)
        with jax.numpy_dtype_promotion("standard"):
            opt_state = optimizer.init(params)
        shard = lambda tree: jax.tree.map(lambda _: replicated, tree)  # noqa: E731
        fn = make_step(static, optimizer, compute_dtype=compute_dtype, remat=remat, param_shardings=shard(params),
                       opt_shardings=shard(opt_state))  # fmt: skip
        frozen = jax.tree.map(lambda _: None, params)
        return fn, [params, opt_state, jax.random.key_data(jax.random.key(0)), frozen]

    def torch_step(bf16):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, attn_implementation="sdpa")).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        t_ids = torch.tensor(ids, dtype=torch.long)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=t_ids, labels=t_ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        return step

    rows = {}
    for label, dtype in (("float32", jnp.float32), ("bfloat16 mixed", jnp.bfloat16)):
        fn, state = eqxlm_step(dtype)
        tokens = jnp.asarray(ids[None])  # (accum 1, batch, seq)

        def ours():
            state[0], state[1], state[2], loss, _ = fn(*state, tokens)
            return float(loss)

        theirs = torch_step(dtype == jnp.bfloat16)
        first = timed(ours, 1)[0]
        losses = (ours(), theirs(), theirs())  # warm-up; recorded: both start near ln(vocab), the same task
        t_ours, t_theirs = [], []
        for _ in range(reps):
            t_ours += timed(ours, 1)
            t_theirs += timed(theirs, 1)
        rows[label] = {
            "eqxlm": Stat([batch * seq / t for t in t_ours]),
            "transformers": Stat([batch * seq / t for t in t_theirs]),
            "eqxlm first step (s)": first,
            "losses": losses,
        }
        r = rows[label]
        print(f"  {label}: eqxlm {r['eqxlm'].cell(' tok/s')}, transformers {r['transformers'].cell(' tok/s')}", flush=True)
        del fn, state, theirs
    long_seq = 256 if quick else 2048
    memory = {}
    for layout in ("unrolled", "scanned"):
        for label, dtype in (("float32", jnp.float32), ("bfloat16 mixed", jnp.bfloat16)):
            for remat in (False, True):
                fn, state = eqxlm_step(dtype, remat=remat, scanned=layout == "scanned")
                abstract = jax.ShapeDtypeStruct((1, 1, long_seq), jnp.int32)
                analysis = fn.lower(*state, abstract).compile().memory_analysis()
                memory[(label, layout, remat)] = {
                    "arguments (GiB)": analysis.argument_size_in_bytes / 2**30,
                    "temporaries (GiB)": analysis.temp_size_in_bytes / 2**30,
                }
    count = eqxlm.parameter_count(eqxlm.DecoderLM(eqxlm.LlamaConfig(**shape), key=jax.random.key(0)))
    return rows, memory, (batch, seq, long_seq), count


# -- transformers -------------------------------------------------------------------------
def bench_torch(folder, dtype, reps, prompts, decode_batches):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    vocab = model.config.vocab_size
    res = {}
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor(np.random.default_rng(p).integers(0, vocab, (1, p)))
            model(ids)
            res[f"prefill {p}"] = Stat([p / t for t in timed(lambda: model(ids).logits, reps)])
        for b in decode_batches:
            ids = torch.tensor(np.random.default_rng(b).integers(0, vocab, (b, 128)))

            def gen(n):
                return lambda: model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
                )

            gen(2)()
            t_long, t_short = timed(gen(LONG), reps), timed(gen(SHORT), reps)
            res[f"decode batch {b}"] = decode_rate(b, t_long, t_short)
    return res


def _run(command: list[str]) -> None:
    print(f"$ {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)


def _run_script(name: str, *args: str) -> None:
    _run([sys.executable, str(HERE / name), *args])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and few runs (seconds)")
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: float32 bfloat16 (quick: float32)")
    parser.add_argument("--models", nargs="+", default=None, help="subset of the shapes")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--only-load", action="store_true", help="measure only from_pretrained (seconds, peak RSS)")
    parser.add_argument("--layers", action="store_true", help="only compile time and decode speed, unrolled vs scanned layers")
    parser.add_argument("--quant", action="store_true", help="only batch-1 decode of float32 vs eqxlm.quantize int8 / int4")
    parser.add_argument("--train", action="store_true", help="only training steps/s (~125M Llama, seq 512) vs torch AdamW")
    parser.add_argument(
        "--long-context", action="store_true",
        help="only long context: 2k/8k prefill memory and speed vs transformers (long_context.py), then the 33k decode test",
    )  # fmt: skip
    parser.add_argument("--quant-quality", action="store_true", help="only the quality cost of int8/int4 (quant_quality.py)")
    args = parser.parse_args(argv)
    if args.long_context or args.quant_quality:  # scripts of their own (fresh processes), run from here
        if args.long_context:
            lengths = "512,1024" if args.quick else "2048,8192"
            first = lengths.split(",")[0]
            reps = str(args.reps or 1)
            _run_script("long_context.py", "--lengths", lengths, "--reps", reps, "--torch", "--no-blocks-up-to", first)
            test = Path(__file__).resolve().parent.parent / "tests" / "test_long_decode.py"
            print("\n## decoding past 32k positions with a sliding-window cache (against transformers)\n", flush=True)
            _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", str(test)])
        if args.quant_quality:
            _run_script("quant_quality.py", *(["--new", "16"] if args.quick else []))
        return
    shapes = QUICK_SHAPES if args.quick else SHAPES
    reps = args.reps or (2 if args.quick else 3)
    dtypes = args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"])
    prompts = [16, 32] if args.quick else [128, 512]
    batches = [1, 8]
    print(
        f"# eqxlm benchmark, {time.strftime('%Y-%m-%d')}, {platform.machine()} with {os.cpu_count()} cores, "
        f"jax {jax.__version__}, command: python benchmarks/bench.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    )
    flops, bandwidth = roofline(reps, args.quick)
    print(f"\nroofline: matmul {flops.cell(' GFLOP/s')}; weight streaming (f32 matrix-vector) {bandwidth.cell(' GB/s')}\n")
    report = {"roofline": {"gflops": flops.runs, "gbps": bandwidth.runs}, "models": {}}
    if args.quant:
        rows, loads = bench_quant(reps, args.quick)
        shape = "mistral-tiny" if args.quick else "mistral-0.5b"
        print(f"## weight-only quantization, {shape}, batch 1 (load average at each round: {loads})\n")
        print("| variant | weights | decode batch 1 | vs float32 | prefill 128 | first generate (s) |")
        print("|---|---|---|---|---|---|")
        base = rows["float32"]["decode batch 1"].median
        for name, r in rows.items():
            d = r["decode batch 1"]
            print(
                f"| {name} | {r['weights (GB)'] * 1e3:,.1f} MB | {d.cell(' tok/s')} | {d.median / base:.2f}x | "
                f"{r['prefill 128'].cell(' tok/s')} | {r['first generate (s)']:.1f} |"
            )
        report["quant"] = {n: {k: (v.runs if isinstance(v, Stat) else v) for k, v in r.items()} for n, r in rows.items()}
        report["quant_load_average"] = loads
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        return
    if args.train:
        rows, memory, (batch, seq, long_seq), count = bench_train(reps, args.quick)
        print(f"## training step, Llama {count / 1e6:.1f}M parameters, batch {batch} x {seq} tokens, AdamW\n")
        print("| precision | eqxlm | transformers + torch AdamW | eqxlm / transformers | eqxlm first step (s) |")
        print("|---|---|---|---|---|")
        for label, r in rows.items():
            ratio = r["eqxlm"].median / r["transformers"].median
            print(f"| {label} | {r['eqxlm'].cell(' tok/s')} | {r['transformers'].cell(' tok/s')} | {ratio:.2f}x | "
                  f"{r['eqxlm first step (s)']:.1f} |")  # fmt: skip
        print(f"\n## eqxlm step memory at sequence {long_seq} (batch 1; XLA memory_analysis of the compiled step)\n")
        print("| precision | layers | remat | arguments (params, AdamW state) | temporaries |\n|---|---|---|---|---|")
        for (label, layout, remat), m in memory.items():
            print(f"| {label} | {layout} | {'yes' if remat else 'no'} | {m['arguments (GiB)']:.2f} GiB | "
                  f"{m['temporaries (GiB)']:.2f} GiB |")  # fmt: skip
        report["train"] = {
            label: {"eqxlm": r["eqxlm"].runs, "transformers": r["transformers"].runs,
                    "eqxlm first step (s)": r["eqxlm first step (s)"], "losses": r["losses"]}
            for label, r in rows.items()
        }  # fmt: skip
        report["train_memory"] = {
            f"{label}/{layout}/{'remat' if remat else 'no remat'}": m for (label, layout, remat), m in memory.items()
        }
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        return
    if args.layers:
        depths, rows = bench_layers(reps, args.quick)
        print("## compile time against depth, unrolled and scanned layers (BLOOM-wide, float32)\n")
        print("| figure | " + " | ".join(f"{d} layers, {lay}" for d in depths for lay in ("unrolled", "scanned")) + " |")
        print("|---|" + "---|" * (2 * len(depths)))
        layouts = [(d, lay) for d in depths for lay in ("unrolled", "scanned")]
        for key in ("compile prefill (s)", "compile generate (s)", "decode batch 1"):
            unit = "" if "(s)" in key else " tok/s"
            print(f"| {key} | " + " | ".join(rows[c][key].cell(unit) for c in layouts) + " |")
        for lay in ("unrolled", "scanned"):
            deep, shallow = rows[(depths[1], lay)], rows[(depths[0], lay)]
            ratio = deep["compile prefill (s)"].median / shallow["compile prefill (s)"].median
            loop = deep["compile generate (s)"].median / shallow["compile generate (s)"].median
            print(f"\n{lay}: {depths[1]}-layer / {depths[0]}-layer compile: prefill {ratio:.2f}x, generate {loop:.2f}x")
        report["layers"] = {f"{d}/{lay}": {k: v.runs for k, v in r.items()} for (d, lay), r in rows.items()}
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        return
    runs = {name: (config, "2GB") for name, config in shapes.items()}
    if args.only_load and not args.quick:
        runs.update(SHARDED_SHAPES)
    for name, (config, shard_size) in runs.items():
        if args.models and name not in args.models:
            continue
        folder = checkpoint(name, config, args.cache, shard_size)
        layers = "num_hidden_layers" if hasattr(config, "num_hidden_layers") else "n_layer"
        two = dataclasses.replace(config, **{layers: 2})
        for dtype in dtypes:
            loads = {lib: load_in_fresh_process(lib, folder, dtype) for lib in ("eqxlm", "transformers")}
            if args.only_load:
                nbytes = sum(f.stat().st_size for f in folder.glob("*.safetensors")) // (2 if dtype != "float32" else 1)
                shards = len(list(folder.glob("*.safetensors")))
                print(f"## {name} ({shards} files), {dtype}: from_pretrained in a fresh process\n")
                print("| library | seconds | peak RSS | above baseline / weights | RSS with every weight read |")
                print("|---|---|---|---|---|")
                for lib, (seconds, base, peak, touched) in loads.items():
                    print(
                        f"| {lib} | {seconds:.2f} s | {peak:.2f} GiB (runtime baseline {base:.2f} GiB, weights "
                        f"{nbytes / 2**30:.2f} GiB) | {(peak - base) * 2**30 / nbytes:.2f}x | {touched:.2f} GiB |"
                    )
                print()
                continue
            ours, nbytes = bench_eqxlm(folder, dtype, reps, prompts, batches, two)
            theirs = bench_torch(folder, dtype, reps, prompts, batches)
            print(f"## {name}, {dtype} ({nbytes / 1e9:.2f} GB of weights)\n")
            print("| figure | eqxlm | transformers | eqxlm / transformers |\n|---|---|---|---|")
            for key, stat in ours.items():
                unit = "" if "(s)" in key else " tok/s"
                if key in theirs:
                    ratio = stat.median / theirs[key].median
                    print(f"| {key} | {stat.cell(unit)} | {theirs[key].cell(unit)} | {ratio:.2f}x |")
                else:
                    print(f"| {key} | {stat.cell(unit)} | none (eager) | |")
            roof = bandwidth.median * 1e9 / nbytes
            print(
                f"| decode batch 1 as a fraction of the roofline ({roof:.1f} tok/s) | "
                f"{ours['decode batch 1'].median / roof:.0%} | {theirs['decode batch 1'].median / roof:.0%} | |"
            )
            for lib, (seconds, base, peak, _) in loads.items():
                print(
                    f"| from_pretrained, fresh process: {lib} | {seconds:.2f} s, peak RSS {peak:.2f} GiB "
                    f"(runtime baseline {base:.2f} GiB, weights {nbytes / 2**30:.2f} GiB) | | |"
                )
            print()
            report["models"][f"{name}/{dtype}"] = {
                "eqxlm": {k: v.runs for k, v in ours.items()},
                "transformers": {k: v.runs for k, v in theirs.items()},
                "load": loads,
                "weight_bytes": nbytes,
            }
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
