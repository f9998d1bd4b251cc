"""The lm-eval adapter against lm-eval's own `hf` backend, on the same checkpoints and local tasks.

Tasks: tests/data/lm_eval/*.yaml (multiple choice with an empty-context question, perplexity
over texts longer than the context, greedy generation to a newline), run offline. Models: the
embedded default model, and a tiny Llama and a tiny BLOOM made here by transformers (saved with
the default model's tokenizer files). Per request: log-likelihoods within 1e-4 (float32), the
same greedy flags, identical generated text; metrics identical.
"""

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import lm_eval  # in the `eval` and `test` extras
import numpy as np
import pytest
import torch
import transformers
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

import eqxlm
from eqxlm.harness import EqxlmLM

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "tests" / "data" / "lm_eval"
TASKS = ["eqxlm_mc", "eqxlm_ppl", "eqxlm_gen"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

pytestmark = pytest.mark.slow  # ~4 min in all on two CPU cores (lm-eval's task loading and torch dominate)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)  # the task YAMLs name their JSONL files from the repository root


def tiny(kind: str, folder: Path) -> Path:
    torch.manual_seed(0)
    common = dict(vocab_size=2048, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, **common,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **common)
        model = transformers.BloomForCausalLM(config)
    with torch.no_grad():  # larger weights than the init's, so the distributions are far from flat
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(eqxlm.default_model_path() / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    return {
        "default": eqxlm.default_model_path(),
        "llama": tiny("llama", root / "llama"),
        "bloom": tiny("bloom", root / "bloom"),
    }


def run(model, **kwargs):
    return lm_eval.simple_evaluate(
        model=model,
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(TASK_DIR)),
        log_samples=True,
        batch_size=4,
        **kwargs,
    )


def samples(results, task):
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


@pytest.mark.parametrize("name", ["default", "llama", "bloom"])
def test_matches_the_hf_backend(checkpoints, name):
    folder = str(checkpoints[name])
    start = time.perf_counter()
    hf = run("hf", model_args={"pretrained": folder, "dtype": "float32", "device": "cpu"})
    if name == "default":  # the registered name, with lm-eval's model_args string
        ours = run("eqxlm", model_args=f"pretrained={folder},dtype=float32")
    else:  # an instance
        ours = run(EqxlmLM(pretrained=folder, dtype="float32", batch_size=4))
    print(f"{name}: both backends in {time.perf_counter() - start:.1f} s")

    compared = {"loglikelihood": 0, "rolling": 0, "generate": 0}
    for task in TASKS:
        for a, b in zip(samples(hf, task), samples(ours, task), strict=True):
            assert a["doc_id"] == b["doc_id"] and a["arguments"] == b["arguments"]
            for ra, rb in zip(a["resps"], b["resps"], strict=True):
                (va,), (vb,) = ra, rb
                if task == "eqxlm_gen":
                    assert va == vb, (name, a["arguments"])
                    compared["generate"] += 1
                elif task == "eqxlm_ppl":
                    assert abs(va - vb) <= 1e-4 * max(1.0, abs(va)), (name, va, vb)  # sums over up to ~1,000 tokens
                    compared["rolling"] += 1
                else:
                    assert abs(va[0] - vb[0]) <= 1e-4, (name, va, vb)
                    assert va[1] == vb[1]
                    compared["loglikelihood"] += 1
    assert compared == {"loglikelihood": 40, "rolling": 4, "generate": 9}
    for task in ("eqxlm_mc", "eqxlm_gen"):  # counts: identical
        assert hf["results"][task] == ours["results"][task], task
    # perplexities are exp(-sum / count) of the sums compared above: equal in log to float32 rounding
    for metric in ("word_perplexity,none", "byte_perplexity,none"):
        assert abs(math.log(ours["results"]["eqxlm_ppl"][metric]) - math.log(hf["results"]["eqxlm_ppl"][metric])) < 1e-5
    assert abs(ours["results"]["eqxlm_ppl"]["bits_per_byte,none"] - hf["results"]["eqxlm_ppl"]["bits_per_byte,none"]) < 1e-5
    if name == "default":  # the default model writes text, not one repeated token
        outputs = [s["resps"][0][0] for s in samples(ours, "eqxlm_gen")]
        assert len(set(outputs)) > 5 and sum(bool(o.strip()) for o in outputs) > 5


def test_thousand_requests_compile_a_handful_of_times():
    """1,000 loglikelihood requests of 3 to ~500 tokens: one compile per length bucket."""
    lm = EqxlmLM(pretrained="eqxlm/default", dtype="float32", batch_size=8)
    rng = np.random.default_rng(0)
    words = "the return statement leaves the current function call with the expression list".split()
    requests = []
    for i in range(1000):
        n = int(np.exp(rng.uniform(0, np.log(250))))  # 1 to 250 words, log-uniform: every bucket, mostly short
        context = " ".join(rng.choice(words, n))
        requests.append(Instance("loglikelihood", {}, (context, " value"), i))
    events = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, d, **kw: events.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
    )
    start = time.perf_counter()
    scores = lm.loglikelihood(requests, disable_tqdm=True)
    elapsed = time.perf_counter() - start
    lengths = {len(lm.tok_encode(r.args[0] + r.args[1])) - 1 for r in requests}
    buckets = {min(eqxlm.generation.bucket_length(n), 512) for n in lengths}
    print(f"1,000 requests, {len(buckets)} length buckets: {len(events)} compilations, {elapsed:.1f} s")
    assert len(scores) == 1000 and all(math.isfinite(s) for s, _ in scores)
    assert len(events) <= len(buckets) + 2, (len(events), sorted(buckets))  # + the first batch's host-side conversions


def test_command_lines(checkpoints, tmp_path):
    """The README's two command lines: lm-eval's CLI through the launcher, and `eqxlm eval`."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    launcher = subprocess.run(
        [sys.executable, "-m", "eqxlm.harness", "--model", "eqxlm", "--model_args", "pretrained=eqxlm/default,dtype=float32",
         "--tasks", "eqxlm_mc", "--include_path", "tests/data/lm_eval", "--limit", "4", "--output_path", str(tmp_path / "a")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )  # fmt: skip
    assert launcher.returncode == 0, launcher.stderr[-3000:]
    assert "|eqxlm_mc|" in launcher.stdout.replace(" ", "") and "|acc|" in launcher.stdout.replace(" ", "")
    wrapper = subprocess.run(
        [sys.executable, "-m", "eqxlm.cli", "eval", "eqxlm/default", "--tasks", "eqxlm_mc",
         "--include-path", "tests/data/lm_eval", "--limit", "4", "--dtype", "float32"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )  # fmt: skip
    assert wrapper.returncode == 0, wrapper.stderr[-3000:]
    # the table, and the progress bar
    assert "|eqxlm_mc|" in wrapper.stdout.replace(" ", "") and "eqxlm loglikelihood" in wrapper.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "eqxlm.cli", "eval", "eqxlm/default", "--tasks", "no_such_task"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )  # fmt: skip
    assert bad.returncode == 2 and "unknown lm-eval task(s) ['no_such_task']" in bad.stderr and "Traceback" not in bad.stderr
