"""Small, readable training utilities: loss, optimiser, a jitted step, batches, evaluation,
and `fit`, a loop over random windows of one in-memory token array.

Everything here works on any eqxlm causal LM and is what `scripts/train_default_model.py`
and the notebooks use (`eqxlm train` / `eqxlm.train.run_training` is the resumable,
multi-process run built on them):

    optimizer = make_optimizer(learning_rate=1e-3, total_steps=1000)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    for batch in random_batches(tokens, batch_size=32, seq_len=128, seed=0):
        model, opt_state, loss = train_step(model, opt_state, batch, optimizer=optimizer)
"""

import math
import time
from collections.abc import Iterator
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int
from tqdm import tqdm

from ._typing import typecheck
from .nn import AbstractTransparent


@typecheck
def next_token_loss(
    model,
    input_ids: Int[Array, " seq"],
    loss_mask: Bool[Array, " seq"] | None = None,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Summed next-token cross-entropy of one sequence, and the number of predicted tokens.

    Token `t` predicts token `t + 1`; the pair is scored only when `loss_mask` is True at
    both (False marks padding, which attention also ignores). **Returns:** `(sum of losses, count)`, so a batch's
    mean is `sum / count` over all of it.
    """
    logits = model(input_ids, loss_mask).logits[:-1].astype(jnp.float32)
    targets = input_ids[1:]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    if loss_mask is None:
        weight = jnp.ones_like(losses)
    else:  # a target counts only when it and the token predicting it are both real
        weight = (loss_mask[1:] & loss_mask[:-1]).astype(jnp.float32)
    return jnp.sum(losses * weight), jnp.sum(weight)


@typecheck
def batch_loss(model, input_ids: Int[Array, "batch seq"], loss_mask: Bool[Array, "batch seq"] | None = None) -> Float[Array, ""]:
    """Mean next-token cross-entropy over every predicted token of a batch (`jax.vmap`)."""
    total, count = jax.vmap(next_token_loss, in_axes=(None, 0, 0 if loss_mask is not None else None))(model, input_ids, loss_mask)
    return jnp.sum(total) / jnp.maximum(jnp.sum(count), 1.0)


@typecheck
def load_balancing_loss(
    router_logits: Float[Array, "layers batch seq experts"],
    top_k: int,
    attention_mask: Int[Array, "batch seq"] | Bool[Array, "batch seq"] | None = None,
) -> Float[Array, ""]:
    """The mixture-of-experts load-balancing loss (Switch Transformer eqs. 4-6), as
    transformers' `load_balancing_loss_func` computes it: over every layer's router logits
    and every real token (`attention_mask`), `E * sum_e f_e * P_e` with `f_e` the fraction of
    top-k assignments to expert `e` and `P_e` its mean softmax probability. Add
    `config.router_aux_loss_coef *` this to the language-model loss (transformers' total
    with `output_router_logits=True`). Router logits per layer: `SparseMoE.router`."""
    n_experts = router_logits.shape[-1]
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    _, selected = jax.lax.top_k(probs, top_k)
    mask = jnp.ones(router_logits.shape[1:3], jnp.float32) if attention_mask is None else attention_mask.astype(jnp.float32)
    counts = jnp.sum(jax.nn.one_hot(selected, n_experts, dtype=jnp.float32) * mask[None, :, :, None, None], axis=(0, 1, 2, 3))
    prob_sums = jnp.sum(probs * mask[None, :, :, None], axis=(0, 1, 2))
    rows = router_logits.shape[0] * jnp.sum(mask)
    return jnp.sum((counts / rows) * (prob_sums / rows)) * n_experts


def make_optimizer(
    learning_rate: float = 1e-3,
    *,
    total_steps: int,
    warmup_steps: int | None = None,
    weight_decay: float = 0.1,
    max_grad_norm: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.95,
) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay (to 10%), after global-norm clipping.

    Weight decay applies to matrices only (not to norms, biases or other vectors).
    """
    warmup_steps = max(1, total_steps // 20) if warmup_steps is None else warmup_steps
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1), end_value=learning_rate / 10
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p is not None and p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask),
    )


class Remat(AbstractTransparent):
    """A layer whose activations are recomputed in the backward pass
    (`eqx.filter_checkpoint`): less memory for more compute. See `remat_layers`.
    Transparent to parameter names (`eqxlm.params`), so a wrapped model saves as is."""

    layer: eqx.Module
    transparent_field: ClassVar[str] = "layer"

    def __call__(self, *args, **kwargs):
        return eqx.filter_checkpoint(lambda layer, *a: layer(*a, **kwargs))(self.layer, *args)


def remat_layers(model):
    """Wrap every layer of `model` (the instances of its `remat_types`, scanned stacks
    included) in [`Remat`][] (gradient checkpointing)."""
    types = tuple(getattr(model, "remat_types", ()))
    if not types:
        raise TypeError(f"{type(model).__name__} names no `remat_types`: nothing to rematerialise.")
    is_layer = lambda x: isinstance(x, types)  # noqa: E731
    return jax.tree.map(lambda x: Remat(x) if is_layer(x) else x, model, is_leaf=is_layer)


def unremat_layers(model):
    """Undo [`remat_layers`][] (parameter names are the same either way: [`Remat`][] is an
    `eqxlm.nn.AbstractTransparent` wrapper)."""
    is_remat = lambda x: isinstance(x, Remat)  # noqa: E731
    return jax.tree.map(lambda x: x.layer if is_remat(x) else x, model, is_leaf=is_remat)


def train_step(
    model,
    opt_state,
    input_ids: Int[Array, "batch seq"],
    loss_mask: Bool[Array, "batch seq"] | None = None,
    *,
    optimizer: optax.GradientTransformation,
    mesh=None,
    rules=None,
    trainable=None,
):
    """One optimiser step on a batch. **Returns:** `(model, opt_state, loss)`.

    `opt_state` is donated (its buffers are reused for the returned one, so do not use it
    again); the model and the batch are not: the batch may be fed again, and a model's frozen
    weights may be shared with another (the base model of `eqxlm.lora.add_adapters`).

    With a `mesh` (a model placed by `eqxlm.shard`), the updated parameters are pinned to
    the layout of `rules` (default: the model's `partition_rules()`) so every step keeps it.
    With `trainable` (a filter for `eqx.partition`, e.g. `eqxlm.lora.trainable(model)`), only
    those leaves get gradients and updates; `opt_state` is then
    `optimizer.init(eqx.filter(model, trainable))`."""
    kept = (model, input_ids, loss_mask, optimizer, mesh, rules, trainable)
    return _train_step(kept, opt_state)


# filter_jit donates either every argument or all but the first: what must survive the step
# travels in the first.
@eqx.filter_jit(donate="all-except-first")
def _train_step(kept, opt_state):
    model, input_ids, loss_mask, optimizer, mesh, rules, trainable = kept
    if trainable is None:
        loss, grads = eqx.filter_value_and_grad(batch_loss)(model, input_ids, loss_mask)
        params = eqx.filter(model, eqx.is_array)
    else:
        params, frozen = eqx.partition(model, trainable)
        partial_loss = lambda p: batch_loss(eqx.combine(p, frozen), input_ids, loss_mask)  # noqa: E731
        loss, grads = eqx.filter_value_and_grad(partial_loss)(params)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int step counts and floats
        updates, opt_state = optimizer.update(grads, opt_state, params)
    model = eqx.apply_updates(model, updates)
    if mesh is not None:
        from .sharding import shardings

        model = eqx.filter_shard(model, shardings(model, mesh, rules))
    return model, opt_state, loss


def random_batches(tokens: np.ndarray, *, batch_size: int, seq_len: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Endless `batch_size x seq_len` windows at random offsets of a 1-D token stream."""
    if len(tokens) <= seq_len:
        raise ValueError(f"token stream ({len(tokens)}) must be longer than seq_len ({seq_len}).")
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
        yield np.stack([tokens[s : s + seq_len] for s in starts]).astype(np.int32)


@eqx.filter_jit
def _eval_sums(model, input_ids):
    total, count = jax.vmap(next_token_loss, in_axes=(None, 0, None))(model, input_ids, None)
    return jnp.sum(total), jnp.sum(count)


def evaluate(model, tokens: np.ndarray, *, seq_len: int, batch_size: int = 16) -> dict[str, float]:
    """Mean next-token loss and perplexity over consecutive `seq_len` windows of `tokens`
    (every window in full; a tail shorter than a window is dropped)."""
    n = (len(tokens) - 1) // seq_len
    windows = np.asarray(tokens[: n * seq_len]).reshape(n, seq_len).astype(np.int32)
    total = count = 0.0
    for i in range(0, n, batch_size):
        s, c = _eval_sums(model, jnp.asarray(windows[i : i + batch_size]))
        total += float(s)
        count += float(c)
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(count)}


def fit(
    model,
    tokens: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    learning_rate: float = 1e-3,
    seed: int = 0,
    remat: bool = False,
    progress: bool = True,
    log_every: int = 10,
):
    """Train `model` on random windows of `tokens`. **Returns:** `(model, history)`, with
    `history` a list of `{"step", "loss", "tokens_per_s"}` every `log_every` steps."""
    optimizer = make_optimizer(learning_rate, total_steps=steps)
    model = remat_layers(model) if remat else model
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    history = []
    bar = tqdm(total=steps, disable=not progress, desc="train", unit="step")
    batches = random_batches(tokens, batch_size=batch_size, seq_len=seq_len, seed=seed)
    start = time.perf_counter()
    for step in range(steps):
        model, opt_state, loss = train_step(model, opt_state, jnp.asarray(next(batches)), optimizer=optimizer)
        bar.update()  # before the loss is shown, so the bar's count is the step that loss is of
        if (step + 1) % log_every == 0 or step + 1 == steps:
            loss = float(loss)
            rate = (step + 1) * batch_size * seq_len / (time.perf_counter() - start)
            history.append({"step": step + 1, "loss": loss, "tokens_per_s": rate})
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
    bar.close()
    return (unremat_layers(model) if remat else model), history
