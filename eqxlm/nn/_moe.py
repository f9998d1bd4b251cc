"""Sparse mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).

A router (`gate`, a bias-free linear map to one logit per expert) picks `top_k` experts per
token; each token's output is the router-weighted sum of those experts' gated MLPs. The
experts are stored **stacked**: one `GatedMLP` whose every array has a leading experts axis,
so they shard along that axis and a layer of them scans like any other layer. Checkpoint
names stay per expert (`mlp.experts.3.gate_proj.weight`): `eqxlm.params` names index `e`
of the stacked axis `experts.{e}` because the class says `stacked_field = "experts"`.

Routing (`MixtralTopKRouter`, `Qwen3MoeTopKRouter`, `OlmoeTopKRouter`, `Qwen2MoeTopKRouter`
in transformers 5.23 all compute this): `softmax(logits in float32)`, top-k of the
probabilities, optionally renormalised to sum to one (`normalize`: Mixtral always,
the others when `norm_topk_prob`). `MixtralTopKRouter` leaves the weights float32, the others
round them to the logits' dtype (`SparseMoE.float32_weights`, which the family sets). Exact
ties break toward the lower expert index (`jax.lax.top_k`). `torch.topk`'s order among
exactly equal values on CPU is implementation-defined (of four equal values it picks experts
2 and 3), so an exact tie (e.g. an all-zero router) is the one case where the selection can
differ from transformers'; distinct probabilities select the same experts in the same order.

Three dispatch paths, chosen from static shapes, give the same numbers (in reduced precision
the same bits; in float32 up to the summation order inside a matrix product):

- `"gather"` (decode: `tokens * top_k <= 2 * experts`): one (token, expert) pair at a time,
  each reading only its expert's weights, so a one-token step reads `top_k` of the experts;
- `"grouped"` (prefill, training): sort the (token, expert) pairs by expert, lay each
  expert's tokens out in blocks of `block_size` rows (a group padded to whole blocks), and
  scan the blocks, each multiplied by its own expert's weights: about `tokens * top_k`
  rows of work instead of `tokens * experts`, and no token dropped;
- `"dense"`: every expert on every token (a reference for tests).

Under `jax.vmap` (a batch, as `eqxlm.generate` runs a model) the batch's tokens are
dispatched together (`expert_outputs`, a `jax.custom_batching.custom_vmap` rule), so the path
is chosen from `batch * seq` tokens. Batched row by row, the expert choice itself would
become batched: `lax.switch` runs every branch (every expert for every row) and an index
into the stack copies the selected weights; together, each pair reads only its expert.

The combine is transformers' default experts implementation in 5.23 (`grouped_mm`; `batched_mm`
combines the same way): each selected expert's output (rounded to the activations' dtype) times
its routing weight in the wider of the two dtypes (Mixtral: float32; the others: the weights'
bfloat16, the product rounded), summed over the `k` slots in routing order in float32, rounded
once. (The `"eager"` loop differs in reduced precision: it adds each product, rounded, into a
buffer of the activations' dtype with `index_add_`, in ascending expert order, rounding after
every add.)

In reduced precision every intermediate that torch rounds (each projection, the activation, the
gated product, the combine's terms and sum) is rounded here too, with `jax.lax.reduce_precision`
before the cast: XLA may drop a cast to bfloat16 that is followed by one back to float32 (it
allows itself excess precision) and carry the float32 value on, which moved the gather and
grouped paths off transformers' numbers. So the three paths give the same bits.
"""

import functools
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._typing import typecheck
from ._activations import in_float32, silu
from ._kinds import AbstractSequenceWise, AbstractStacked, AbstractTapped
from ._linear import accumulator, make_linear
from ._mlp import GatedMLP
from ._taps import each_token, tap

DISPATCH = ("auto", "gather", "grouped", "dense")


@typecheck
def route(logits: Float[Array, "seq experts"], top_k: int, normalize: bool) -> tuple[Float[Array, "seq k"], Int[Array, "seq k"]]:
    """The routing weights (float32) and selected experts from router `logits`: softmax in
    float32, top-k (exact ties toward the lower index), renormalised when `normalize`."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, index = jax.lax.top_k(probs, top_k)
    if normalize:
        # a true division, as torch's: XLA turns `a / broadcast(b)` into `a * (1 / b)`
        total = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.sum(weights, axis=-1, keepdims=True), weights.shape))
        weights = weights / total
    return weights, index.astype(jnp.int32)


def _round_as(x: Array, dtype) -> Array:
    """`x` (float32) rounded to `dtype`'s precision and kept float32; `x` itself for a dtype
    of 32 bits or more. A cast to `dtype` alone is not kept: XLA may drop a cast to bfloat16
    followed by one back to float32 (excess precision), `reduce_precision` it keeps."""
    info = jnp.finfo(dtype)
    if info.bits >= 32:
        return x
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def _rounded(x: Array, dtype) -> Array:
    """`x` (an accumulator) as `dtype`, rounded once, as torch rounds a result."""
    return _round_as(x, dtype).astype(dtype)


def _wide(x: Array) -> Array:
    """`x`'s values in its accumulator dtype, exactly `x`'s even where XLA dropped its last
    rounding (see [`_round_as`][])."""
    return _round_as(x.astype(accumulator(x.dtype)), x.dtype)


def _mm(a: Array, b: Array) -> Array:
    """`a @ b` accumulated in float32 and rounded once (`F.linear` in bfloat16)."""
    return _rounded(jnp.matmul(a, b, preferred_element_type=accumulator(a.dtype)), a.dtype)


def _gated(gate: Array, up: Array, activation: Callable) -> Array:
    """`activation(gate) * up`, the product rounded once to their dtype, as torch's."""
    return _rounded(_wide(activation(gate)) * _wide(up), up.dtype)


def combine(contrib: Float[Array, "seq k hidden"], weights: Float[Array, "seq k"]) -> Float[Array, "seq hidden"]:
    """The selected experts' outputs `contrib` weighted by `weights` and summed per token, as
    transformers' `grouped_mm` experts: each product in the wider of the two dtypes (rounded to
    it), summed over the `k` slots in order in float32, rounded once to `contrib`'s dtype."""
    product_dtype = max(contrib.dtype, weights.dtype, key=lambda d: jnp.finfo(d).bits)
    terms = _round_as(_wide(contrib) * _wide(weights)[..., None], product_dtype)
    out = terms[:, 0]
    for j in range(1, terms.shape[1]):
        out = out + terms[:, j]
    return _rounded(out, contrib.dtype)


def _expert_mlp(x, gate_w, up_w, down_w, activation):
    """One gated MLP on rows `x` with weights in `(out, in)` layout (a block of the grouped
    path: input-first, `x @ w.T`, which XLA:CPU ran faster than the weight-first form for a
    prefill layer; benchmarks/NOTES.md, "Mixture of experts")."""
    return _mm(_gated(_mm(x, gate_w.T), _mm(x, up_w.T), activation), down_w.T)


@functools.partial(jax.jit, static_argnums=(5, 6))
def _blocks_through_experts(blocks, block_expert, gate_w, up_w, down_w, activation, by_switch):
    """Each block of rows (`blocks`: `(n_blocks, block, hidden)`) through the expert that
    `block_expert` names (`num_experts`: an unused block, left zero), one block per scan
    step. `by_switch`: `lax.switch` picks the expert's branch, which reads its slab of the
    stacked weights in place (indexing the stack with a traced scalar copies the slab;
    reverse mode through a switch on a batched index fails, so differentiation indexes).
    A module-level jitted function, so an eager (unjitted) forward compiles it once per
    shape instead of once per call."""
    n_exp = gate_w.shape[0]
    if by_switch:
        branches = [functools.partial(_one_expert, e, activation) for e in range(n_exp)]
        branches.append(lambda xb, *weights: jnp.zeros_like(xb))

        def body(_, xs):
            xb, i = xs
            return None, jax.lax.switch(i, branches, xb, gate_w, up_w, down_w)

    else:

        def body(_, xs):
            xb, i = xs
            i = jnp.minimum(i, n_exp - 1)  # an unused block's rows are zeros and never read back
            return None, _expert_mlp(xb, gate_w[i], up_w[i], down_w[i], activation)

    return jax.lax.scan(body, None, (blocks, block_expert))[1]


def choose_path(dispatch: str, tokens: int, top_k: int, num_experts: int) -> str:
    """`dispatch` unless `"auto"`: then `"gather"` for up to `2 * num_experts` (token, expert)
    pairs, `"grouped"` beyond. Gather reads one expert's weights per pair; the grouped scan
    reads one per block, and there are up to `num_experts` more blocks than whole blocks of
    pairs. The threshold is where the two paths crossed over at the 0.5B Mixtral shape on CPU
    (benchmarks/NOTES.md, "Mixture of experts")."""
    if dispatch != "auto":
        return dispatch
    return "gather" if tokens * top_k <= 2 * num_experts else "grouped"


def _gather(x, index, gate_w, up_w, down_w, activation, block_size):
    # One (token, slot) pair per scan step; `lax.switch` picks the expert's branch, so only
    # that expert's weights are read. Gathering the selected weights instead
    # (`gate_w[index]`) copies them and runs a batched dot that XLA transposes, and a dynamic
    # index inside the scan copies the expert's slab: both ran slower on CPU (NOTES.md).
    seq, k = index.shape
    branches = [functools.partial(_one_expert, e, activation) for e in range(gate_w.shape[0])]

    def body(_, pair):
        row, e = pair
        return None, jax.lax.switch(e, branches, row[None], gate_w, up_w, down_w)[0]

    rows = jnp.repeat(x, k, axis=0)  # pair (s, j) at row s * k + j
    return jax.lax.scan(body, None, (rows, index.reshape(-1)))[1].reshape(seq, k, -1)


def _one_expert(e, activation, x, gate_w, up_w, down_w):
    """Expert `e` of the stack on rows `x` (a `lax.switch` branch of the gather and grouped
    paths). Input-first, as `_expert_mlp`: for one row on XLA:CPU this beat the weight-first
    forms in a whole decode step (benchmarks/NOTES.md, "Mixture of experts")."""
    return _expert_mlp(x, gate_w[e], up_w[e], down_w[e], activation)


def _gather_indexed(x, index, gate_w, up_w, down_w, activation, block_size):
    # The same numbers by indexing the stack: what differentiation uses (reverse mode through
    # a `lax.switch` on a batched index fails in jax 0.10: no transpose for `stop_gradient`).
    g, u, d = gate_w[index], up_w[index], down_w[index]  # (seq, k, ...)
    h = _gated(_einsum("sh,skih->ski", x, g), _einsum("sh,skih->ski", x, u), activation)
    return _einsum("ski,skhi->skh", h, d)


def _einsum(subscripts, a, b):
    """[`_mm`][] as an einsum."""
    return _rounded(jnp.einsum(subscripts, a, b, preferred_element_type=accumulator(a.dtype)), a.dtype)


def _dense(x, index, gate_w, up_w, down_w, activation, block_size):
    # every expert on every token, weight-first (`w @ x.T`): vmapped input-first, XLA:CPU
    # copied every expert's weights into the transposed layout first (NOTES.md)
    def expert(g, u, d):
        xt = x.T
        return _mm(d, _gated(_mm(g, xt), _mm(u, xt), activation)).T

    out = jax.vmap(expert)(gate_w, up_w, down_w)  # (experts, seq, hidden)
    return out[index, jnp.arange(x.shape[0])[:, None]]  # (seq, k, hidden)


def _grouped(x, index, gate_w, up_w, down_w, activation, block_size, by_switch=True):
    seq, k = index.shape
    n_pairs, n_exp = seq * k, gate_w.shape[0]
    block = max(1, min(block_size, n_pairs))
    n_blocks = -(-n_pairs // block) + n_exp  # each group padded to whole blocks: at most this many
    flat = index.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # pairs sorted by expert
    sorted_exp = flat[order]
    sizes = jnp.bincount(flat, length=n_exp)
    starts = jnp.cumsum(sizes) - sizes
    padded = -(-sizes // block) * block
    padded_ends = jnp.cumsum(padded)
    padded_starts = padded_ends - padded
    rank = jnp.arange(n_pairs) - starts[sorted_exp]
    dest = padded_starts[sorted_exp] + rank  # row of each sorted pair in the block layout
    rows = jnp.zeros((n_blocks * block, x.shape[1]), x.dtype).at[dest].set(x[order // k])
    block_exp = jnp.searchsorted(padded_ends, jnp.arange(n_blocks) * block, side="right")  # n_exp: unused
    blocks = rows.reshape(n_blocks, block, -1)
    out = _blocks_through_experts(blocks, block_exp, gate_w, up_w, down_w, activation, by_switch)
    out = out.reshape(n_blocks * block, -1)[dest]  # sorted pairs
    unsorted = jnp.zeros((n_pairs, x.shape[1]), x.dtype).at[order].set(out)
    return unsorted.reshape(seq, k, -1)


_PATHS = {"gather": _gather, "grouped": _grouped, "dense": _dense}


def _one_example(x, index, gate_w, up_w, down_w, *, activation, dispatch, block_size, differentiable=False):
    path = choose_path(dispatch, x.shape[0], index.shape[1], gate_w.shape[0])
    if differentiable and path == "gather":
        return _gather_indexed(x, index, gate_w, up_w, down_w, activation, block_size)
    if differentiable and path == "grouped":
        return _grouped(x, index, gate_w, up_w, down_w, activation, block_size, by_switch=False)
    return _PATHS[path](x, index, gate_w, up_w, down_w, activation, block_size)


@functools.cache
def _batch_aware(activation, dispatch, block_size):
    """`_one_example` that, under `jax.vmap` over tokens with shared expert weights, runs once
    on the batch's tokens together (the path chosen for all of them) instead of once per row.
    Row by row, the expert index would be batched: `lax.switch` would run every expert on
    every row and an index into the stack would copy weights. Differentiation goes
    through the per-example function (`custom_vmap` has no reverse mode), so gradients and
    training are unchanged."""
    one = functools.partial(_one_example, activation=activation, dispatch=dispatch, block_size=block_size)

    @jax.custom_batching.custom_vmap
    def batched(x, index, gate_w, up_w, down_w):
        return one(x, index, gate_w, up_w, down_w)

    @batched.def_vmap
    def rule(axis_size, in_batched, x, index, gate_w, up_w, down_w):
        if any(in_batched[2:]):  # experts differ per row (an ensemble): nothing to share
            axes = tuple(0 if b else None for b in in_batched)
            return jax.vmap(one, in_axes=axes)(x, index, gate_w, up_w, down_w), True
        if not in_batched[0]:
            x = jnp.broadcast_to(x, (axis_size, *x.shape))
        if not in_batched[1]:
            index = jnp.broadcast_to(index, (axis_size, *index.shape))
        out = differentiable(x.reshape(-1, x.shape[-1]), index.reshape(-1, index.shape[-1]), gate_w, up_w, down_w)
        return out.reshape(*index.shape, -1), True

    @jax.custom_jvp
    def differentiable(x, index, gate_w, up_w, down_w):
        return batched(x, index, gate_w, up_w, down_w)

    @differentiable.defjvp
    def _jvp(primals, tangents):
        return jax.jvp(functools.partial(one, differentiable=True), primals, tangents)

    return differentiable


@typecheck
def expert_outputs(
    x: Float[Array, "seq hidden"],
    index: Int[Array, "seq k"],
    gate_w: Float[Array, "experts intermediate hidden"],
    up_w: Float[Array, "experts intermediate hidden"],
    down_w: Float[Array, "experts hidden intermediate"],
    *,
    activation: Callable,
    dispatch: str = "auto",
    block_size: int = 64,
) -> Float[Array, "seq k hidden"]:
    """Each token's selected experts' outputs (`index[s, j]`'s gated MLP on `x[s]`), unweighted.

    The path is chosen from the number of tokens (`choose_path`). Under `jax.vmap` (a batch
    of sequences, as `eqxlm.generate` runs the model) the batch's tokens are dispatched
    together, so the path is chosen from `batch * seq` tokens: a batch-8 decode step takes
    the grouped path and reads each selected expert once."""
    return _batch_aware(activation, dispatch, block_size)(x, index, gate_w, up_w, down_w)


class SparseMoE(AbstractSequenceWise, AbstractStacked, AbstractTapped):
    """A sparse mixture-of-experts feed-forward block over a whole sequence.

    `gate`: router `Linear(hidden, num_experts)` without bias; `experts`: a `GatedMLP`
    stacked over experts (leaves `(num_experts, ...)`); optional `shared_expert` (a
    `GatedMLP` every token goes through) scaled by `sigmoid(shared_expert_gate(x))`
    (Qwen2-MoE). `dispatch` is `"auto"` (gather for few tokens, grouped otherwise) or one
    path forced: `"gather"`, `"grouped"`, `"dense"`; every path gives the same numbers.
    `float32_weights`: the routing weights stay float32 into the combine (Mixtral's router)
    instead of being rounded to the activations' dtype (Qwen2-MoE, Qwen3-MoE, OLMoE); only
    reduced precision tells them apart.
    """

    gate: eqx.nn.Linear
    experts: GatedMLP
    shared_expert: GatedMLP | None
    shared_expert_gate: eqx.nn.Linear | None
    num_experts: int = eqx.field(static=True)
    top_k: int = eqx.field(static=True)
    normalize: bool = eqx.field(static=True)
    float32_weights: bool = eqx.field(static=True, default=False)
    dispatch: str = eqx.field(static=True, default="auto")
    block_size: int = eqx.field(static=True, default=64)

    stacked_field: ClassVar[str] = "experts"
    tap_points: ClassVar[tuple[str, ...]] = ("router_logits", "routing_weights", "selected_experts")

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        normalize: bool = True,
        float32_weights: bool = False,
        shared_intermediate_size: int | None = None,
        activation: Callable = silu,
        dispatch: str = "auto",
        block_size: int = 64,
        dtype=jnp.float32,
        key: PRNGKeyArray,
    ):
        """**Arguments:** `hidden_size`; `intermediate_size` of each expert (HF
        `moe_intermediate_size`, Mixtral `intermediate_size`); `num_experts`; `top_k`
        (`num_experts_per_tok`); `normalize` (renormalise the top-k weights);
        `float32_weights` (keep the routing weights float32 rather than round them to the
        activations' dtype);
        `shared_intermediate_size` (a shared expert with its sigmoid gate, or None);
        `activation`; `dispatch`; `block_size` (rows per block of the grouped path);
        `dtype`; `key`."""
        if dispatch not in DISPATCH:
            raise ValueError(f"SparseMoE: dispatch must be one of {DISPATCH}, got {dispatch!r}.")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"SparseMoE: top_k (num_experts_per_tok) must be in [1, {num_experts}], got {top_k}.")
        k_gate, k_experts, k_shared, k_sgate = jax.random.split(key, 4)
        self.gate = make_linear(hidden_size, num_experts, False, dtype, k_gate)
        self.experts = eqx.filter_vmap(
            lambda k: GatedMLP(hidden_size, intermediate_size, activation=activation, dtype=dtype, key=k)
        )(jax.random.split(k_experts, num_experts))
        if shared_intermediate_size is None:
            self.shared_expert, self.shared_expert_gate = None, None
        else:
            self.shared_expert = GatedMLP(hidden_size, shared_intermediate_size, activation=activation, dtype=dtype, key=k_shared)
            self.shared_expert_gate = make_linear(hidden_size, 1, False, dtype, k_sgate)
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize = normalize
        self.float32_weights = float32_weights
        self.dispatch = dispatch
        self.block_size = block_size

    @typecheck
    def router(
        self, x: Float[Array, "seq hidden"], *, taps=None
    ) -> tuple[Float[Array, "seq experts"], Float[Array, "seq k"], Int[Array, "seq k"]]:
        """Router logits, routing weights (float32 when `float32_weights`, else `x`'s dtype)
        and selected experts for every token of `x` (`taps`: the `eqxlm.inspect` points of
        [`__call__`][]; patched logits re-route)."""
        logits = tap(taps, "router_logits", _mm(x, self.gate.weight.T))
        weights, index = route(logits, self.top_k, self.normalize)
        if not self.float32_weights:
            weights = _rounded(weights, x.dtype)
        return logits, tap(taps, "routing_weights", weights), tap(taps, "selected_experts", index)

    def path(self, tokens: int) -> str:
        """The dispatch path for `tokens` tokens (static; under `jax.vmap`, the batch's
        tokens together: see [`expert_outputs`][])."""
        return choose_path(self.dispatch, tokens, self.top_k, self.num_experts)

    @typecheck
    def __call__(self, x: Float[Array, "seq hidden"], *, taps=None) -> Float[Array, "seq hidden"]:
        """**Arguments:** `x`; `taps` (static, set by an `eqxlm.inspect` hook: the points
        `router_logits` (`seq experts`, before routing: patching them re-routes),
        `routing_weights` (`seq k`) and `selected_experts` (`seq k`, int32)). None = none."""
        _, weights, index = self.router(x, taps=taps)
        e = self.experts
        contrib = expert_outputs(
            x, index, e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight,
            activation=e.activation, dispatch=self.dispatch, block_size=self.block_size,
        )  # fmt: skip
        out = combine(contrib, weights)
        if self.shared_expert is not None:
            shared = each_token(self.shared_expert, x)
            shared = _gated(_mm(x, self.shared_expert_gate.weight.T), shared, in_float32(jax.nn.sigmoid))
            out = _rounded(_wide(out) + _wide(shared), x.dtype)
        return out
