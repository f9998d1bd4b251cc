"""What weight-only quantization costs in quality, measured on the embedded default model.

    python benchmarks/quant_quality.py          # ~2-4 min on 2 cores

For float32, int8 and int4 (`eqxlm.quantize`; groups of 64 and 32: the default model's
hidden size 192 is not a multiple of 128):

- validation loss and perplexity on the default model's own validation split (the documents
  `scripts/train_default_model.py` holds out, tokenized with the shipped tokenizer;
  `eqxlm.training.evaluate`, 128-token windows, as `training_log.json` was computed);
- greedy agreement with the float model over `--new` generated tokens from each of the
  prompts: *free-running* (position by position, both models generating on their own; one
  early difference makes the rest differ) and *teacher-forced* (the quantized model's argmax
  at every position of the float model's generated text: the per-token rate, no compounding).
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from train_default_model import corpus, encode, split  # noqa: E402

import eqxlm  # noqa: E402
from eqxlm.training import evaluate  # noqa: E402

PROMPTS = [
    "The return statement",
    "A class definition",
    "The with statement is used to",
    "Exceptions can be raised",
    "The for loop iterates over",
    "Lists are mutable sequences",
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new", type=int, default=64, help="tokens generated per prompt")
    args = parser.parse_args(argv)
    folder = eqxlm.default_model_path()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    _, val_docs = split(corpus())
    val_ids = encode(tok, val_docs)
    model = eqxlm.from_pretrained(folder)
    variants = {
        "float32": model,
        "int8": eqxlm.quantize(model, bits=8),
        "int4 g64": eqxlm.quantize(model, bits=4, group_size=64),
        "int4 g32": eqxlm.quantize(model, bits=4, group_size=32),
    }
    print(f"# quantization quality, default model, {len(val_ids):,} validation tokens, load {os.getloadavg()}")
    prompts = [np.asarray(tok.encode(p).ids, np.int32) for p in PROMPTS]
    forward = eqx.filter_jit(lambda m, ids: m(ids).logits)
    generated = {}
    for name, m in variants.items():
        generated[name] = [
            np.asarray(eqxlm.generate(m, p[None], max_new_tokens=args.new, eos_token_id=[]))[0, len(p) :] for p in prompts
        ]
    print("\n| variant | validation loss | change | perplexity | greedy agreement, free-running | teacher-forced | seconds |")
    print("|---|---|---|---|---|---|---|")
    total = len(prompts) * args.new
    base = None
    for name, m in variants.items():
        start = time.perf_counter()
        val = evaluate(m, val_ids, seq_len=128)
        base = val["loss"] if base is None else base
        free = sum(int(np.sum(a == b)) for a, b in zip(generated[name], generated["float32"], strict=True))
        forced = 0
        for p, ref in zip(prompts, generated["float32"], strict=True):
            ids = jnp.asarray(np.concatenate([p, ref[:-1]]))
            forced += int(np.sum(np.argmax(np.asarray(forward(m, ids))[len(p) - 1 :], axis=-1) == ref))
        print(
            f"| {name} | {val['loss']:.5f} | {val['loss'] - base:+.5f} | {val['perplexity']:.2f} | "
            f"{free}/{total} ({free / total:.1%}) | "
            f"{forced}/{total} ({forced / total:.1%}) | {time.perf_counter() - start:.0f} |"
        )
    print(f"\nload average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
