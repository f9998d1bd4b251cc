"""Train eqxlm's embedded default model from scratch, reproducibly, on 2 CPU cores.

    python scripts/train_default_model.py --out eqxlm/default_model

Corpus: English text that ships with every CPython, under the PSF licence: the Python
documentation topics (`pydoc_data.topics`, the text behind `help("topic")`) and the
docstrings of the standard library's modules, classes and functions (parsed with `ast`
from the .py files of this interpreter's stdlib, tests and demos left out). Documents are
split 95/5 into train and validation by a CRC of their text.

Tokenizer: byte-level BPE trained with `tokenizers` (vocabulary 2048, `<|endoftext|>`
separates documents and is BOS/EOS). Model: Mistral (GQA, sliding window 64 shorter than
the 128-token training context), ~2M parameters, float32. Writes a Hugging Face folder
with `config.json`, `model.safetensors`, `generation_config.json`, `tokenizer.json`,
`tokenizer_config.json` (special tokens and a simple chat template, for `eqxlm chat`,
transformers' AutoTokenizer and lm-eval's `hf` backend) and `training_log.json` (losses,
validation perplexity, unigram baseline, timings).
"""

import argparse
import ast
import json
import math
import os
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import jax
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import eqxlm
from eqxlm.training import evaluate, fit

EOS = "<|endoftext|>"
SKIP_DIRS = {"test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__", "turtledemo", "ensurepip", "tkinter"}


def corpus() -> list[str]:
    """The documents, in a fixed order."""
    import pydoc_data.topics

    docs = [pydoc_data.topics.topics[k].strip() for k in sorted(pydoc_data.topics.topics)]
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(dirpath, name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 40:
                        docs.append(doc.strip())
    return docs


def split(docs: list[str]) -> tuple[list[str], list[str]]:
    is_val = [zlib.crc32(d.encode()) % 20 == 0 for d in docs]
    return [d for d, v in zip(docs, is_val, strict=True) if not v], [d for d, v in zip(docs, is_val, strict=True) if v]


# `<|endoftext|>` (id 0) is BOS, EOS and padding; the chat template turns a conversation into
# "Role: text" documents, each ended by `<|endoftext|>` (the model saw documents, not dialogues).
TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "add_bos_token": False,
    "add_eos_token": False,
    "padding_side": "right",
    "model_max_length": 512,
    "clean_up_tokenization_spaces": False,
    "added_tokens_decoder": {
        "0": {
            "content": "<|endoftext|>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    },
    "chat_template": (
        "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] | trim }}\n"
        "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
    ),
}


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    return tok


def encode(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, np.int32)


def unigram_perplexity(train_ids: np.ndarray, val_ids: np.ndarray, vocab: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fit on the training tokens."""
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return math.exp(-float(np.mean(logp[val_ids])))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="eqxlm/default_model", help="output folder")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    docs = corpus()
    train_docs, val_docs = split(docs)
    tok = train_tokenizer(train_docs, args.vocab)
    train_ids, val_ids = encode(tok, train_docs), encode(tok, val_docs)
    eos = tok.token_to_id(EOS)
    print(
        f"corpus: {len(docs)} documents, {sum(map(len, docs)):,} characters; "
        f"{len(train_ids):,} train / {len(val_ids):,} validation tokens",
        flush=True,
    )

    config = eqxlm.MistralConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        sliding_window=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=(eos,),
        pad_token_id=eos,
        initializer_range=0.02,
    )
    model = eqxlm.DecoderLM(config, key=jax.random.key(args.seed))
    print(f"model: {eqxlm.parameter_count(model):,} parameters", flush=True)
    t_train = time.perf_counter()
    model, history = fit(
        model,
        train_ids,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        learning_rate=args.lr,
        seed=args.seed,
        progress=sys.stderr.isatty(),
        log_every=50,
    )
    train_seconds = time.perf_counter() - t_train
    val = evaluate(model, val_ids, seq_len=args.seq_len)
    train_eval = evaluate(model, train_ids[: len(val_ids)], seq_len=args.seq_len)
    unigram = unigram_perplexity(train_ids, val_ids, tok.get_vocab_size())
    print(
        f"validation loss {val['loss']:.3f} (perplexity {val['perplexity']:.1f}); unigram perplexity "
        f"{unigram:.1f}; training {train_seconds:.0f} s",
        flush=True,
    )

    out = eqxlm.save_pretrained(model, args.out)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    log = {
        "command": "python scripts/train_default_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "corpus": {
            "documents": len(docs),
            "train_tokens": int(len(train_ids)),
            "validation_tokens": int(len(val_ids)),
            "sources": "pydoc_data.topics + CPython stdlib docstrings (PSF licence)",
        },
        "parameters": eqxlm.parameter_count(model),
        "validation": val,
        "train_sample": train_eval,
        "unigram_validation_perplexity": unigram,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - t0,
        "history": history,
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
