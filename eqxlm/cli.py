"""The `eqxlm` command line: `eqxlm generate` streams text from a checkpoint.

eqxlm generate --prompt "The return statement"           # the embedded default model
eqxlm generate path/or/org/repo --prompt "..." --temperature 0 --max-new-tokens 50
eqxlm chat [MODEL]                                      # talk to it (chat template, KV cache kept)
eqxlm eval MODEL --tasks TASKS [--include-path DIR]     # lm-evaluation-harness (extra `eqxlm[eval]`)
eqxlm info [MODEL]                                      # architecture, sizes, files
eqxlm train --data notes.txt --output-dir runs/a        # fine-tune (needs the `train` extra)
"""

import argparse
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import __version__, checkpoint
from .default import DEFAULT_MODEL
from .tokenizer import load_tokenizer

_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/backend_compile_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
)


class _CompileTimer:
    """Sums the trace, lowering and XLA compile durations that JAX reports."""

    def __init__(self):
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event in _COMPILE_EVENTS:
            self.seconds += duration


def _fail(message: str) -> int:
    print(f"eqxlm: error: {message}", file=sys.stderr)
    return 2


def _sampling_config(args):
    """The command's sampling options as one `SamplingConfig` (`--temperature 0` is greedy,
    `--top-k 0` off); a bad value is refused naming its option."""
    from .generation import SamplingConfig, SamplingConfigError

    sample = args.temperature != 0  # a negative or NaN temperature reaches SamplingConfig's check
    try:
        return SamplingConfig(
            do_sample=sample,
            temperature=args.temperature if sample else 1.0,
            top_k=args.top_k or None,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
        )
    except SamplingConfigError as e:
        valid = _CLI_RANGES.get(e.field, e.valid)
        raise ValueError(f"--{e.field.replace('_', '-')} must be {valid}, got {e.value}.") from None


# where the command line's values differ from the API's (0 is greedy / off; no None to type)
_CLI_RANGES = {"temperature": ">= 0 (0 = greedy)", "top_k": ">= 0 (0 = off)", "top_p": "in (0, 1]", "min_p": "in [0, 1]"}


def cmd_generate(args) -> int:
    from .generation import generate

    sampling = _sampling_config(args)
    timer = _CompileTimer()
    folder = checkpoint.resolve(args.model, revision=args.revision)
    tokenizer = load_tokenizer(folder)
    model = checkpoint.from_pretrained(folder, dtype=args.dtype)
    ids = tokenizer.encode(args.prompt)
    bos = model.generation_config.bos_token_id if model.generation_config else None
    if not args.no_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    if not ids:
        if bos is not None:
            return _fail(
                f"the prompt is empty and --no-bos leaves nothing to start from (without --no-bos it starts from BOS, id {bos})."
            )
        return _fail("the prompt is empty and the model has no BOS token to start from.")
    # Every check of the request before a character is printed, so an error stands alone.
    from .generation import check_request

    check_request(model, np.ones((1, len(ids)), bool), args.max_new_tokens, sampling)

    eos = set(model.generation_config.eos_token_id or ()) if model.generation_config else set()
    produced: list[int] = []
    times: list[float] = []
    decoder = tokenizer.stream_decoder()  # holds back half a multi-byte character

    def stream(tokens: np.ndarray) -> None:
        times.append(time.perf_counter())
        token = int(tokens[0])
        if produced and produced[-1] in eos:
            return
        produced.append(token)
        if token not in eos:
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()

    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    timer.seconds = 0.0  # count the generation's own compiles, not the loading's traces
    start = time.perf_counter()
    generate(
        model,
        jnp.asarray([ids], jnp.int32),
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        key=jax.random.key(args.seed),
        streamer=stream,
    ).block_until_ready()
    end = time.perf_counter()
    sys.stdout.write(decoder.flush())
    decode_rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")
    print()
    mode = (
        "greedy" if args.temperature <= 0 else f"T={args.temperature}, top_k={args.top_k}, top_p={args.top_p}, seed={args.seed}"
    )
    if sampling.min_p is not None:
        mode += f", min_p={sampling.min_p}"
    if sampling.repetition_penalty != 1.0:
        mode += f", repetition_penalty={sampling.repetition_penalty}"
    print(
        f"[{len(produced)} new tokens ({mode}) | prompt {len(ids)} tokens | total {end - start:.2f} s, "
        f"of which compile {timer.seconds:.2f} s | decode {decode_rate:.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0


def cmd_chat(args) -> int:
    from .chat import ChatSession, run

    sampling = _sampling_config(args)
    folder = checkpoint.resolve(args.model, revision=args.revision)
    tokenizer = load_tokenizer(folder)
    model = checkpoint.from_pretrained(folder, dtype=args.dtype)
    session = ChatSession(
        model,
        tokenizer,
        system=args.system,
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        seed=args.seed,
    )
    from .models._contract import architecture_name

    print(
        f"eqxlm chat: {args.model} ({architecture_name(model)}, up to {session.max_length} tokens). "
        "Ctrl-D or Ctrl-C to quit, /reset for a new conversation.",
        file=sys.stderr,
    )
    return run(session)


def cmd_eval(args) -> int:
    try:
        from .harness import evaluate
    except ImportError as e:
        return _fail(f"`eqxlm eval` needs lm-evaluation-harness: pip install 'eqxlm[eval]' ({e}).")
    return evaluate(args)


def cmd_info(args) -> int:
    folder = checkpoint.resolve(args.model, revision=args.revision)
    model = checkpoint.from_pretrained(folder)
    config = model.config
    print(f"{config.architecture} ({config.model_type}, {type(model).__name__}) from {folder}")
    print(f"parameters: {checkpoint.parameter_count(model):,}")
    for name, value in sorted(config.to_hf().items()):
        print(f"  {name}: {value}")
    print(f"tokenizer.json: {'yes' if (folder / 'tokenizer.json').exists() else 'no'}")
    return 0


def cmd_train(args) -> int:
    try:
        from .train import TrainConfig, run_training
    except ImportError as e:
        return _fail(f"`eqxlm train` needs the train extra (pip install 'eqxlm[train]'): {e}.")
    import dataclasses

    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    try:
        config.check()
    except ValueError as e:  # name the flag the user typed, not the field behind it
        return _fail(re.sub(r"TrainConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e)))
    try:
        run = run_training(config)
    except ImportError as e:
        return _fail(str(e))
    if run.export_dir is not None:
        print(f"exported {run.export_dir}", file=sys.stderr)
    return 0


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """One flag per `TrainConfig` field (`--seq-len` for `seq_len`), help from its metadata."""
    import dataclasses
    import typing

    from .train._config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        help_text = f.metadata["help"]
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif f.metadata.get("nargs"):
            parser.add_argument(flag, nargs=f.metadata["nargs"], required=True, metavar="FILE", help=help_text)
        else:
            required = f.name == "output_dir"
            default = None if required else f.default
            suffix = "" if required or f.default is None else f" (default {f.default})"
            parser.add_argument(flag, type=base, default=default, required=required, help=help_text + suffix)


class _Parser(argparse.ArgumentParser):
    """argparse that takes every negative number for a value. Its own test for one (`-1`,
    `-0.5`) misses exponents and infinities, so `--learning-rate -1e-3` was read as an unknown
    option ("expected one argument") where `--learning-rate=-1e-3` was read as a number."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse reads this (private) attribute for "looks like a negative number"; sub-commands
        # are made with the parent's class, so they share it. tests/test_cli.py checks every
        # numeric option both ways.
        self._negative_number_matcher = re.compile(r"^-(\.?\d|inf(inity)?$)", re.IGNORECASE)


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """The options `generate` and `chat` share beyond temperature, top-k and top-p."""
    parser.add_argument(
        "--min-p", type=float, default=None, help="keep tokens at least MIN_P times as likely as the top one (default off)"
    )
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="divide the logits of tokens already present (multiply when negative), > 0; greedy too (default 1.0 = off)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="eqxlm",
        description="eqxlm: language models as small, shape-checked Equinox parts.",
        epilog="MODEL is a local Hugging Face folder or a hub repo id (honours HF_HUB_OFFLINE and the hub cache); "
        f"omitted, it is the embedded default model ({DEFAULT_MODEL}).",
    )
    parser.add_argument("--version", action="version", version=f"eqxlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="stream a continuation of a prompt",
        description="Generate text from a prompt, streamed as it is produced, then a one-line summary on stderr "
        "(tokens, decode tokens/s, compile seconds). Sampling by default; --temperature 0 is greedy.",
    )
    gen.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        metavar="MODEL",
        help=f"checkpoint folder or hub repo id (default: {DEFAULT_MODEL}, the embedded model)",
    )
    gen.add_argument("--prompt", "-p", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", "-n", type=int, default=64, help="tokens to generate (default 64)")
    gen.add_argument("--temperature", "-t", type=float, default=0.7, help="sampling temperature; 0 = greedy (default 0.7)")
    gen.add_argument("--top-k", type=int, default=40, help="sample among the K most likely tokens (default 40; 0 = off)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1] (default off)")
    _add_sampling_options(gen)
    gen.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    gen.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="compute dtype (default: the checkpoint's)"
    )
    gen.add_argument("--revision", default=None, help="hub branch, tag or commit")
    gen.add_argument("--no-bos", action="store_true", help="do not prepend the model's BOS token")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser(
        "chat",
        help="talk to a model in the terminal",
        description="An interactive conversation using the checkpoint's chat template. Replies stream as they are "
        "produced; the KV cache is kept across turns, so each turn prefills only its new tokens. Ctrl-D or Ctrl-C "
        "quits; /reset starts a new conversation. Greedy by default.",
    )
    chat.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        metavar="MODEL",
        help=f"checkpoint folder or hub repo id with a chat template (default: {DEFAULT_MODEL})",
    )
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--max-new-tokens", "-n", type=int, default=256, help="longest reply in tokens (default 256)")
    chat.add_argument("--max-length", type=int, default=None, help="tokens the conversation may hold (default: the model's)")
    chat.add_argument("--temperature", "-t", type=float, default=0.0, help="sampling temperature; 0 = greedy (default 0)")
    chat.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens (default off)")
    chat.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1] (default off)")
    _add_sampling_options(chat)
    chat.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    chat.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="compute dtype (default: the checkpoint's)"
    )
    chat.add_argument("--revision", default=None, help="hub branch, tag or commit")
    chat.set_defaults(func=cmd_chat)

    ev = sub.add_parser(
        "eval",
        help="score a model with lm-evaluation-harness",
        description="Run lm-evaluation-harness tasks on a checkpoint through eqxlm's adapter (needs the `eval` extra: "
        "pip install 'eqxlm[eval]'), with a progress bar, and print lm-eval's results table.",
    )
    ev.add_argument("model", metavar="MODEL", help="checkpoint folder or hub repo id (eqxlm/default for the embedded model)")
    ev.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    ev.add_argument("--include-path", default=None, help="folder of extra task YAML files")
    ev.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    ev.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt")
    ev.add_argument("--batch-size", type=int, default=8, help="requests per compiled batch (default 8)")
    ev.add_argument("--max-length", type=int, default=None, help="context length (default: the model's)")
    ev.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="compute dtype (default: the checkpoint's)"
    )
    ev.add_argument("--output-path", default=None, help="write results (and samples with --log-samples) here")
    ev.add_argument("--log-samples", action="store_true", help="keep every request's inputs and outputs")
    ev.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ev.add_argument("--revision", default=None, help="hub branch, tag or commit")
    ev.set_defaults(func=cmd_eval)

    info = sub.add_parser(
        "info", help="describe a checkpoint", description="Print a checkpoint's architecture, parameter count and config."
    )
    info.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        metavar="MODEL",
        help=f"checkpoint folder or hub repo id (default: {DEFAULT_MODEL})",
    )
    info.add_argument("--revision", default=None, help="hub branch, tag or commit")
    info.set_defaults(func=cmd_info)

    trainer = sub.add_parser(
        "train",
        help="fine-tune a checkpoint (or train a fresh model) on text/JSONL files",
        description="Fine-tune a checkpoint or train a fresh model from a config.json on text or JSONL files, with "
        "resumable Orbax checkpoints, held-out evaluation, metrics.jsonl, loss.png and a Hugging Face export at the end. "
        "Every flag is a field of eqxlm.train.TrainConfig. Several processes: run the same command on every host with "
        "--coordinator-address, --num-processes and --process-id (or the JAX_COORDINATOR_ADDRESS, EQXLM_NUM_PROCESSES, "
        "EQXLM_PROCESS_ID environment variables). Needs the train extra: pip install 'eqxlm[train]'.",
    )
    try:
        _add_train_options(trainer)
    except ImportError:  # the train extra is missing: `eqxlm train` says so when run
        trainer.add_argument("rest", nargs=argparse.REMAINDER)
    trainer.set_defaults(func=cmd_train)
    return parser


# Bounds of the numeric options of generate, chat and eval (the sampling options are
# `SamplingConfig`'s, train's are `TrainConfig.check`'s).
_BOUNDS = {
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),  # NaN fails too
    "max_length": (lambda v: v >= 1, ">= 1"),
    "limit": (lambda v: v > 0, "> 0 (a fraction if < 1)"),
    "num_fewshot": (lambda v: v >= 0, ">= 0"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
}


def _check_numbers(args) -> str | None:
    """What the API would refuse, refused on the command line before anything runs."""
    if args.command == "train":
        return None
    for name, (ok, bound) in _BOUNDS.items():
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            return f"--{name.replace('_', '-')} must be {bound}, got {value}."
    if hasattr(args, "temperature"):  # generate and chat
        try:
            _sampling_config(args)
        except ValueError as e:
            return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _check_numbers(args)
    if problem:
        return _fail(problem)
    if getattr(args, "top_k", None) == 0:
        args.top_k = None
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, MemoryError) as e:  # CheckpointError and ConfigError are ValueErrors
        return _fail(str(e))  # a multi-line message is a list (of changed options, say): keep its lines
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
