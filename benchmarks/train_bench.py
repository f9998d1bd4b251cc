"""Training throughput of `eqxlm train` and checkpoint save/restore times, on this machine.

    python benchmarks/train_bench.py                  # ~125M Llama shape (minutes on 2 cores)
    python benchmarks/train_bench.py --quick          # a tiny shape, seconds (smoke run)

Throughput: `eqxlm train` on a fresh Llama of the ~125M shape (vocab 32000, hidden 768,
intermediate 2048, 12 layers, 12 heads; 134M parameters, untied head), float32, AdamW,
batch 8 (`--batch-size`) x 128 tokens, on CPython's pydoc text, in fresh processes: 1 process x 1 device,
1 process x 8 simulated devices, and 2 processes x 4 devices each over localhost
(jax.distributed, gloo), the 8-device layouts on `--mesh` (default data=8). tokens/s is read from each step's
metrics row (the step's tokens over its wall time); the first two steps (compilation) are
left out, and the median with min/max of the rest is printed.

Checkpoints: the trainer's Orbax state (float32 parameters + AdamW moments, 3 copies) for
Llama shapes of growing width, saved with the trainer's CheckpointManager settings: the time
the training loop is blocked (async save returns), the time until the checkpoint is
committed, and a full restore; medians of --reps.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's eqxlm, also for the child processes (PYTHONPATH below)

SHAPES = {  # name: (hidden, intermediate, layers, heads, vocab)
    "125m": (768, 2048, 12, 12, 32000),
    "tiny": (64, 128, 2, 4, 2048),
}
CKPT_SHAPES = {
    "full": [(256, 688, 4, 4, 32000), (512, 1376, 8, 8, 32000), (768, 2048, 12, 12, 32000)],
    "quick": [(64, 128, 2, 4, 2048), (128, 256, 2, 4, 2048)],
}


def config_json(shape, folder: Path) -> Path:
    hidden, inter, layers, heads, vocab = shape
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": 2048,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    import eqxlm

    shutil.copy(eqxlm.default_model_path() / "tokenizer.json", folder / "tokenizer.json")
    return folder


def corpus(path: Path) -> Path:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    path.write_text("\n\n".join(topics[k].strip().replace("\n\n", "\n") for k in sorted(topics)))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def throughput(model_dir, data, work: Path, *, processes: int, devices: int, steps: int, mesh: str, batch: int) -> dict:
    out = work / f"run-{processes}x{devices}"
    args = ["--model-config", str(model_dir), "--data", str(data), "--output-dir", str(out), "--steps", str(steps),
            "--batch-size", str(batch), "--seq-len", "128", "--mesh", mesh, "--eval-fraction", "0", "--save-every", "100000",
            "--no-export", "--no-plot", "--no-progress"]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}  # fmt: skip
    port = free_port()
    extra = lambda i: ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(processes), "--process-id", str(i)]  # noqa: E731
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "eqxlm.cli", "train", *args, *(extra(i) if processes > 1 else [])],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(err[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][2:]
    return {"processes": processes, "devices_per_process": devices, "mesh": mesh, "steps_timed": len(rates),
            "median": statistics.median(rates), "min": min(rates), "max": max(rates)}  # fmt: skip


def checkpoint_times(shapes, work: Path, reps: int) -> list[dict]:
    import equinox as eqx
    import jax
    import orbax.checkpoint as ocp

    import eqxlm
    from eqxlm.training import make_optimizer

    results = []
    for shape in shapes:
        hidden, inter, layers, heads, vocab = shape
        config = eqxlm.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=heads)  # fmt: skip
        params = eqx.filter(eqxlm.DecoderLM(config, key=jax.random.key(0)), eqx.is_array)
        with jax.numpy_dtype_promotion("standard"):
            opt_state = make_optimizer(1e-3, total_steps=10).init(params)
        state = {"params": params, "opt_state": opt_state}
        nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
        blocked, committed, restored = [], [], []
        for rep in range(reps):
            folder = work / f"ckpt-{hidden}-{rep}"
            manager = ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
            t0 = time.perf_counter()
            manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
            t1 = time.perf_counter()
            manager.wait_until_finished()
            t2 = time.perf_counter()
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
            back = manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
            jax.block_until_ready(back.state)
            t3 = time.perf_counter()
            manager.close()
            shutil.rmtree(folder)
            blocked.append(t1 - t0)
            committed.append(t2 - t0)
            restored.append(t3 - t2)
        results.append({"parameters": eqxlm.parameter_count(params), "state_mib": nbytes / 2**20,
                        "save_blocking_s": statistics.median(blocked), "save_committed_s": statistics.median(committed),
                        "restore_s": statistics.median(restored), "reps": reps,
                        "spread": {"save_committed_s": [min(committed), max(committed)],
                                   "restore_s": [min(restored), max(restored)]}})  # fmt: skip
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few steps (a smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per configuration (default 8; quick 6)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences of 128 tokens per step (default 8)")
    parser.add_argument("--layouts", default="1x1,1x8,2x4", help="processes x devices to run (default 1x1,1x8,2x4)")
    parser.add_argument("--mesh", default="data=8", help="mesh of the 8-device layouts (default data=8)")
    parser.add_argument("--reps", type=int, default=3, help="checkpoint save/restore repetitions")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    steps = args.steps or (6 if args.quick else 8)
    work = Path(tempfile.mkdtemp(prefix="eqxlm-train-bench-"))
    model_dir = config_json(SHAPES["tiny" if args.quick else "125m"], work / "model")
    data = corpus(work / "docs.txt")
    print(f"machine: {os.cpu_count()} CPU cores; model {SHAPES['tiny' if args.quick else '125m']} (hidden, intermediate, "
          f"layers, heads, vocab); batch {args.batch_size} x 128 tokens; {steps} steps, first 2 left out")  # fmt: skip
    runs = []
    layouts = {"1x1": (1, 1, "data=1"), "1x8": (1, 8, args.mesh), "2x4": (2, 4, args.mesh)}
    for processes, devices, mesh in (layouts[name] for name in args.layouts.split(",")):
        r = throughput(model_dir, data, work, processes=processes, devices=devices, steps=steps, mesh=mesh, batch=args.batch_size)
        runs.append(r)
        print(f"| {processes} process(es) x {devices} device(s), mesh {mesh} | {r['median']:,.0f} tokens/s "
              f"(min {r['min']:,.0f}, max {r['max']:,.0f}, {r['steps_timed']} steps) |", flush=True)  # fmt: skip
    ckpts = checkpoint_times(CKPT_SHAPES["quick" if args.quick else "full"], work, args.reps)
    for c in ckpts:
        print(f"| checkpoint {c['parameters'] / 1e6:,.1f}M params ({c['state_mib']:,.0f} MiB with AdamW state) | save blocks "
              f"{c['save_blocking_s']:.2f} s, committed {c['save_committed_s']:.2f} s "
              f"({c['spread']['save_committed_s'][0]:.2f}-{c['spread']['save_committed_s'][1]:.2f}) | "
              f"restore {c['restore_s']:.2f} s "
              f"({c['spread']['restore_s'][0]:.2f}-{c['spread']['restore_s'][1]:.2f}) |", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"throughput": runs, "checkpoints": ckpts}, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
