"""Batch-1 decode tokens/s of a random Mistral-shaped model with whichever eqxlm is imported,
to compare two checkouts (run it alternately, on a quiet machine):

    PYTHONPATH=/path/to/old/checkout python benchmarks/decode_before_after.py
    python benchmarks/decode_before_after.py

Decode rate = 31 tokens / (time for 64 new tokens - time for 33), so prefill and compile cancel;
the median of 9 pairs is printed with every run (spread is about +-20% on 2 cores).
"""

import statistics
import time

import jax
import numpy as np

import eqxlm

print(eqxlm.__file__)
cfg = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=3584,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    sliding_window=4096,
    max_position_embeddings=32768,
    tie_word_embeddings=False,
)
Model = getattr(eqxlm, "DecoderLM", None) or eqxlm.MistralForCausalLM
model = Model(eqxlm.MistralConfig(**cfg), key=jax.random.key(0))
ids = np.random.default_rng(0).integers(0, 32000, (1, 128)).astype(np.int32)


def run(n):
    t = time.perf_counter()
    eqxlm.generate(model, ids, max_new_tokens=n, eos_token_id=[]).block_until_ready()
    return time.perf_counter() - t


run(64)
run(33)
rates = []
for _ in range(9):
    a, b = run(64), run(33)
    rates.append(31 / (a - b))
print(f"decode batch 1: median {statistics.median(rates):.1f} tok/s, runs {[round(r, 1) for r in rates]}")
