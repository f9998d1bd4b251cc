"""lm-evaluation-harness adapter: score eqxlm models with lm-eval's tasks.

Needs the `eval` extra (`pip install 'eqxlm[eval]'`, lm-eval 0.4.13); `import eqxlm` never
imports this module. Importing it registers the model name `eqxlm` with lm-eval:

    # command line (lm-eval has no plugin entry point: this launcher registers `eqxlm`, then
    # runs lm-eval's own CLI with the same arguments)
    eqxlm-lm-eval --model eqxlm --model_args pretrained=eqxlm/default,dtype=float32 --tasks TASK
    python -m eqxlm.harness --model eqxlm --model_args pretrained=PATH,dtype=float32 --tasks TASK

    # Python
    import lm_eval, eqxlm.harness
    lm_eval.simple_evaluate(model=eqxlm.harness.EqxlmLM(pretrained=PATH), tasks=[...])
    lm_eval.simple_evaluate(model="eqxlm", model_args="pretrained=PATH,dtype=float32", tasks=[...])

`EqxlmLM` subclasses lm-eval's `TemplateLM` (an `LM`) and follows its `hf` backend request by
request, so the numbers are the `hf` backend's on the same checkpoint (tested for the default
model, a tiny Llama and a tiny BLOOM): the same tokenization of context/continuation pairs
(`TemplateLM._encode_pair`, BOS-prefix detection, `prefix_token_id` for empty contexts), the
same left truncation to `max_length` (from `max_position_embeddings`, else the tokenizer's
`model_max_length`, else 2048), the same rolling windows, the same stop-sequence handling.

**Batching without changing results.** Requests are sorted by length and run `batch_size` at a
time, **left**-padded with attention mask 0; eqxlm's positions count real tokens only, so a
padded row scores exactly as it would alone. The log-softmax, the gather of the continuation's
log-probabilities and the greedy check run inside the compiled function, so only two numbers
per request leave the device.

**Compilations.** The batch is always `batch_size` rows (a short last batch repeats a row) and
the padded length is a power of two from 16 (`eqxlm.generation.bucket_length`, capped at
`max_length`), so scoring compiles once per length bucket: at most
`log2(max_length / 16) + 1` times (8 for a 2,048-token model), however many requests.
`generate_until` uses `eqxlm.generate`, which compiles once per prompt bucket and
`max_gen_toks` bucket. A 1,000-request loglikelihood run on the default model (3 to ~500
tokens, so all six buckets 16..512) compiles 6 times, counted with JAX's compile events
(`tests/test_harness.py`).
"""

import sys
from collections.abc import Iterable

import equinox as eqx
import jax
import jax.numpy as jnp
import lm_eval.models  # noqa: F401  (the built-in models register first: lm-eval imports them only into an empty registry)
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from . import checkpoint
from .generation import SamplingConfig, bucket_length, generate
from .models._contract import architecture_name
from .tokenizer import Tokenizer, load_tokenizer

DEFAULT_MAX_LENGTH = 2048  # lm-eval's `hf` default when neither config nor tokenizer says


@eqx.filter_jit
def _score(model, ids, mask, targets, weights):
    """Per row: the summed log-probability of the weighted targets, and whether every weighted
    target is the argmax."""
    logits = jax.vmap(model)(ids, mask).logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    total = jnp.sum(jnp.where(weights, picked, 0.0), axis=-1)
    greedy = jnp.all((jnp.argmax(logits, axis=-1) == targets) | ~weights, axis=-1)
    return total, greedy


def _as_int(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"EqxlmLM: {name} must be an integer, got {value!r}.") from None


def _as_bool(value, name: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"EqxlmLM: {name} must be true or false, got {value!r}.")


def _register(cls):
    # `python -m eqxlm.harness` runs this file as `__main__`; only the module imported by
    # `main()` registers, so the name is never claimed twice.
    return cls if __name__ == "__main__" else register_model("eqxlm")(cls)


@_register
class EqxlmLM(TemplateLM):
    """An eqxlm model behind lm-eval's `LM` interface.

    **Arguments** (all may come from `--model_args key=value,...`): `pretrained` (folder, hub
    repo id or `eqxlm/default`), or `model` + `tokenizer` objects; `dtype` (`float32`,
    `bfloat16`, `float16`; default the checkpoint's); `batch_size` (rows per compiled call,
    default 8); `max_length` (default: as the `hf` backend); `max_gen_toks` (default 256);
    `add_bos_token` (default: the tokenizer's own behaviour); `prefix_token_id` (default: BOS,
    else EOS); `revision`; `seed` (for sampled generation). `device` and `max_batch_size`
    from lm-eval are accepted and ignored (JAX places the model).
    """

    def __init__(
        self,
        pretrained: str = "eqxlm/default",
        *,
        model=None,
        tokenizer: Tokenizer | None = None,
        dtype: str | None = None,
        batch_size: int | str | None = 8,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        add_bos_token: bool | str | None = None,
        prefix_token_id: int | str | None = None,
        revision: str | None = None,
        seed: int | str = 0,
        device: str | None = None,
        max_batch_size: int | None = None,
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise ValueError(f"EqxlmLM: unknown model_args {sorted(unknown)}; see help(eqxlm.harness.EqxlmLM).")
        if dtype in ("auto", ""):
            dtype = None
        if model is None:
            folder = checkpoint.resolve(pretrained, revision=revision)
            model = checkpoint.from_pretrained(folder, dtype=dtype)
            tokenizer = tokenizer or load_tokenizer(folder)
        elif tokenizer is None:
            raise ValueError("EqxlmLM(model=...) needs tokenizer=eqxlm.load_tokenizer(...) too.")
        self.model, self.tokenizer = model, tokenizer
        self.pretrained = str(pretrained)
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = 8
        self.batch_size_per_call = _as_int(batch_size, "batch_size")
        self.add_bos_token = _as_bool(add_bos_token, "add_bos_token")
        self.custom_prefix_token_id = _as_int(prefix_token_id, "prefix_token_id")
        self._max_gen_toks = _as_int(max_gen_toks, "max_gen_toks")
        self._key = jax.random.key(_as_int(seed, "seed"))
        limit = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length or DEFAULT_MAX_LENGTH
        self._max_length = _as_int(max_length, "max_length") or limit
        if self.tokenizer.eos_token_id is None and self.prefix_token_id is None:
            raise ValueError("EqxlmLM: the tokenizer has neither a BOS nor an EOS token; pass prefix_token_id=...")

    # -- what TemplateLM needs -------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_call

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs) -> list[int]:
        """As the `hf` backend: the tokenizer's special tokens unless told otherwise, none when
        the string already starts with the prefix token's text."""
        special = add_special_tokens
        if special is None:
            special = True if self.add_bos_token is None else self.add_bos_token
            prefix = self.tokenizer.decode([self.prefix_token_id])
            if prefix and string.startswith(prefix):
                special = False
        ids = self.tokenizer.encode(string, add_special_tokens=special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt, tokenize=False)

    # -- scoring -------------------------------------------------------------------------------

    def _bucket(self, n: int) -> int:
        return min(bucket_length(n), max(self.max_length, n))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """`requests`: `(key, context_ids, continuation_ids)`; returns `(logprob, is_greedy)` each."""
        rows = []
        for _, context, continuation in requests:
            if not context or not continuation:
                raise ValueError("EqxlmLM: a loglikelihood request needs a non-empty context and continuation.")
            whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
            rows.append((whole[:-1], whole[1:], min(len(continuation), len(whole) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        size = self.batch_size
        bar = tqdm(total=len(rows), disable=disable_tqdm, desc="eqxlm loglikelihood")
        for start in range(0, len(order), size):
            chosen = order[start : start + size]
            length = self._bucket(max(len(rows[i][0]) for i in chosen))
            ids = np.zeros((size, length), np.int32)
            mask = np.zeros((size, length), bool)
            targets = np.zeros((size, length), np.int32)
            weights = np.zeros((size, length), bool)
            for r, i in enumerate(chosen + [chosen[-1]] * (size - len(chosen))):
                inputs, outs, scored = rows[i]
                n = len(inputs)
                ids[r, length - n :], mask[r, length - n :], targets[r, length - n :] = inputs, True, outs
                weights[r, length - scored :] = True
            total, greedy = _score(self.model, ids, mask, targets, weights)
            total, greedy = np.asarray(total), np.asarray(greedy)
            for r, i in enumerate(chosen):
                results[i] = (float(total[r]), bool(greedy[r]))
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, results[i])
            bar.update(len(chosen))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity-style scoring of whole texts in disjoint windows of `max_length`, as `hf`."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            pieces = get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
            )
            for context, continuation in map(make_disjoint_window, pieces):
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores, strict=True):
            totals[owner] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task asks) continuations cut at the stop sequences."""
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="eqxlm generate_until")
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = kwargs.pop("max_gen_toks")
            if max_gen >= self.max_length:
                raise ValueError(f"EqxlmLM: max_gen_toks ({max_gen}) must be less than max_length ({self.max_length}).")
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
            min_p, penalty = kwargs.pop("min_p", None), kwargs.pop("repetition_penalty", None)
            if do_sample and temperature <= 0:
                do_sample = False
            sampling = SamplingConfig(
                do_sample=do_sample,
                temperature=temperature if do_sample else 1.0,
                top_k=int(top_k) if do_sample and top_k else None,
                top_p=float(top_p) if do_sample and top_p is not None else None,
                min_p=float(min_p) if do_sample and min_p is not None else None,
                repetition_penalty=1.0 if penalty is None else float(penalty),
            )
            contexts = {i: self._context_ids(requests[i].args[0], self.max_length - max_gen) for i in indices}
            order = sorted(indices, key=lambda i: -len(contexts[i]))
            for start in range(0, len(order), self.batch_size):
                chosen = order[start : start + self.batch_size]
                rows = chosen + [chosen[-1]] * (self.batch_size - len(chosen))
                width = max(len(contexts[i]) for i in rows)
                ids = np.zeros((len(rows), width), np.int32)
                mask = np.zeros((len(rows), width), np.int32)
                for r, i in enumerate(rows):
                    ids[r, width - len(contexts[i]) :], mask[r, width - len(contexts[i]) :] = contexts[i], 1
                self._key, key = jax.random.split(self._key)
                out = generate(
                    self.model,
                    ids,
                    mask,
                    max_new_tokens=max_gen,
                    sampling=sampling,
                    key=key,
                )
                new = np.asarray(out)[:, width:]
                for r, i in enumerate(chosen):
                    text = postprocess_generated_text(self.tok_decode(new[r].tolist()), stop=until, think_end_token=None)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chosen))
        bar.close()
        return results

    def _context_ids(self, context: str, keep: int) -> list[int]:
        """As `hf`'s `tok_batch_encode`: no special tokens when the text starts with BOS."""
        bos = self.tokenizer.bos_token
        if bos is not None and context.startswith(bos):
            special = False
        else:
            special = True if self.add_bos_token is None else self.add_bos_token
        return self.tokenizer.encode(context, add_special_tokens=special)[-keep:]

    def get_model_info(self) -> dict:
        return {"model": architecture_name(self.model), "pretrained": self.pretrained, "max_length": self.max_length}


def evaluate(args) -> int:
    """`eqxlm eval`: lm-eval's `simple_evaluate` on an `EqxlmLM`, then its results table."""
    import json
    from pathlib import Path

    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    model = EqxlmLM(
        args.model,
        dtype=args.dtype,
        batch_size=args.batch_size,
        max_length=args.max_length,
        revision=args.revision,
        seed=args.seed,
    )
    tasks = [t for t in args.tasks.split(",") if t]
    manager = TaskManager(include_path=args.include_path) if args.include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}; list them with `lm-eval ls tasks` (add --include-path for local YAML)."
        )
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        task_manager=manager,
        log_samples=args.log_samples,
        random_seed=args.seed,
        numpy_random_seed=args.seed,
        torch_random_seed=args.seed,
        fewshot_random_seed=args.seed,
    )
    print(make_table(results))
    if args.output_path:
        out = Path(args.output_path)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        print(f"results written to {out / 'results.json'}", file=sys.stderr)
    return 0


def main() -> None:
    """`eqxlm-lm-eval` / `python -m eqxlm.harness`: lm-eval's own command line, with `--model
    eqxlm` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    from eqxlm.harness import main as _main  # the registered module, not this `__main__` copy

    _main()
