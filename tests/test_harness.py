"""The lm-eval adapter against lm-eval's own `hf` backend, on the same checkpoints and local tasks.

Tasks: tests/data/lm_eval/*.yaml (multiple choice with an empty-context question, perplexity
over texts longer than the context, greedy generation to a newline), run offline. Models: the
embedded default model, and a tiny Llama and a tiny BLOOM made here by transformers (saved with
the default model's tokenizer files). Per request: log-likelihoods within 1e-4 (float32), the
same greedy flags, identical generated text; metrics identical. Those run lm-eval's whole
pipeline (`slow`); the quick checks below score requests directly: the context/continuation
token boundary against the `hf` backend on the same model, `is_greedy` position by position
against a hand-computed argmax.
"""

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
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


@pytest.mark.slow  # lm-eval's whole pipeline, both backends: task loading and torch dominate
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


@pytest.mark.slow  # 1,000 requests
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


@pytest.mark.slow  # three subprocesses
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


# -- quick checks: the context/continuation boundary and is_greedy ----------------------------
@pytest.fixture(scope="module")
def default_lm():
    return EqxlmLM(pretrained="eqxlm/default", dtype="float32", batch_size=4)


WIDTH = 32  # every hand-computed forward right-padded to this: a causal model's earlier positions do not see the padding


@eqx.filter_jit
def _logits(model, ids):
    return model(ids).logits


def _forward(model, ids: list[int]) -> np.ndarray:
    padded = np.zeros(WIDTH, np.int32)
    padded[: len(ids)] = ids
    return np.asarray(_logits(model, jnp.asarray(padded)), np.float64)[: len(ids)]


def _by_hand(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One request alone through a full forward: the continuation's summed log-probability and
    whether each of its tokens is the argmax of the position before it."""
    before = _forward(model, context + continuation)[len(context) - 1 : -1]  # the positions predicting it
    top = before.max(-1, keepdims=True)
    logp = before - top - np.log(np.sum(np.exp(before - top), -1, keepdims=True))
    total = float(np.sum(logp[np.arange(len(continuation)), continuation]))
    return total, bool(np.all(np.argmax(before, -1) == continuation))


def _greedy(model, ids: list[int], n: int) -> list[int]:
    """`ids` and `n` greedy tokens after them."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(np.argmax(_forward(model, ids)[-1])))
    return ids


def test_model_info_names_the_architecture(default_lm):
    """lm-eval writes `get_model_info` into its results: the family's architecture, as the
    banner and `repr` show it, not the builder's class."""
    assert default_lm.get_model_info()["model"] == "MistralForCausalLM"


def test_is_greedy_position_by_position(default_lm):
    """Token requests (`_loglikelihood_tokens`, batched 4 to a call with left padding) against a
    hand-computed argmax of each alone: the model's greedy continuation is greedy; one token off
    at the first, a middle or the last position is not; a context whose last token is not the
    argmax does not count against a greedy continuation."""
    model = default_lm.model
    contexts = [default_lm.tok_encode(t) for t in ("import numpy as", "def add(a, b):\n    return", "for i in range(")]
    requests = []
    for context in contexts:
        greedy = _greedy(model, context, 4)[len(context) :]
        wrong = lambda t: (t + 1) % model.config.vocab_size  # noqa: E731
        off_first = [wrong(greedy[0])] + _greedy(model, context + [wrong(greedy[0])], 3)[len(context) + 1 :]
        requests += [
            (context, greedy),
            (context, greedy[:1]),  # one token
            (context, off_first),  # only the first is not the argmax
            (context, greedy[:2] + [wrong(greedy[2])]),  # only the last
            (context, _greedy(model, context + greedy[:1] + [wrong(greedy[1])], 2)[len(context) :]),  # the second
        ]
    # a context that ends off the model's argmax, then the greedy continuation from there
    context = contexts[0] + [(_greedy(model, contexts[0], 1)[-1] + 7) % model.config.vocab_size]
    requests.append((context, _greedy(model, context, 3)[len(context) :]))
    got = default_lm._loglikelihood_tokens([(None, c, x) for c, x in requests], disable_tqdm=True)
    want = [_by_hand(model, c, x) for c, x in requests]
    assert [g for _, g in want] == [True, True, False, False, False] * 3 + [True]  # the cases are what they say
    for (c, x), (total, greedy), (want_total, want_greedy) in zip(requests, got, want, strict=True):
        assert greedy == want_greedy, (c, x)
        assert abs(total - want_total) <= 1e-4, (c, x, total, want_total)


def test_context_continuation_boundary_matches_the_hf_backend(default_lm):
    """String requests through `loglikelihood` (lm-eval's `_encode_pair`, then eqxlm's scoring)
    and through lm-eval's `hf` backend on the same checkpoint: the same context and continuation
    tokens, log-likelihoods within 1e-4, the same `is_greedy`. Boundaries: a continuation that
    starts with a space; a context that ends mid-word; one that ends with a space (moved to the
    continuation); pieces that the tokenizer merges across the boundary (the context's tokens are
    not a prefix of the whole's); an empty context (the prefix token), before a space too; the
    model's own greedy continuation and the same with its last token changed."""
    from lm_eval.models.huggingface import HFLM

    folder = eqxlm.default_model_path()
    hf = HFLM(
        pretrained=transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
        tokenizer=transformers.AutoTokenizer.from_pretrained(folder),
        device="cpu", batch_size=4, dtype="float32",
    )  # fmt: skip
    pairs = [
        ("The quick brown fox jumps over the lazy", " dog"),
        ("The quick bro", "wn fox"),
        ("def add(a, b):\n    return a ", "+ b"),
        ("hello wo", "rld"),
        ("print(resu", "lt)"),
        ("", "The cat sat"),
        ("", " return x"),
    ]
    for context in ("import numpy as", "class Foo:\n    def __init__(self"):
        ids = default_lm.tok_encode(context)
        greedy = _greedy(default_lm.model, ids, 4)[len(ids) :]
        pairs.append((context, default_lm.tok_decode(greedy)))
        pairs.append((context, default_lm.tok_decode(greedy[:-1] + [(greedy[-1] + 1) % 2048])))
    encode = default_lm.tok_encode
    merged = [(c, x) for c, x in pairs if c and encode(c + x)[: len(encode(c))] != encode(c)]
    assert len(merged) >= 2, merged  # the tokenizer does merge across some of these boundaries
    for context, continuation in pairs:
        if context:
            assert default_lm._encode_pair(context, continuation) == hf._encode_pair(context, continuation)
    requests = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    want = hf.loglikelihood(requests, disable_tqdm=True)
    got = default_lm.loglikelihood(requests, disable_tqdm=True)
    for pair, (total, greedy), (want_total, want_greedy) in zip(pairs, got, want, strict=True):
        assert greedy == want_greedy, pair
        assert abs(total - want_total) <= 1e-4, (pair, total, want_total)
    assert {g for _, g in want} == {True, False}
