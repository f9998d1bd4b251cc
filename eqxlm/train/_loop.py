"""The training run behind `eqxlm train`: `run_training(config)`.

One program for one process or many: under `jax.distributed` every process runs the same
code over a mesh that spans all processes' devices; arrays are global `jax.Array`s, each
process feeds only its rows of a batch and Orbax writes (and reads) only its shards.
"""

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from .. import checkpoint, sharding
from ..params import state_dict
from ..training import make_optimizer, next_token_loss, remat_layers
from ._config import TrainConfig
from ._data import DataError, global_batch, pack, process_rows, read_documents, split_documents, token_stream, train_iterator

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


class TrainError(ValueError):
    """A run that cannot start or resume as asked; nothing was computed or overwritten."""


# -- setup -------------------------------------------------------------------------------------
def _init_distributed(config: TrainConfig) -> None:
    address = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    n = config.num_processes if config.num_processes is not None else os.environ.get("EQXLM_NUM_PROCESSES")
    pid = config.process_id if config.process_id is not None else os.environ.get("EQXLM_PROCESS_ID")
    if address is None and n is None and pid is None:
        return
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(
        coordinator_address=address, num_processes=None if n is None else int(n), process_id=None if pid is None else int(pid)
    )


def parse_mesh(spec: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """`"fsdp=4,tensor=2"` -> sizes and axis names over all devices (one size may be -1)."""
    axes, sizes = [], []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, size = part.partition("=")
        if name not in ("data", "fsdp", "tensor") or not size.lstrip("-").isdigit():
            raise TrainError(f"mesh: {part!r} is not AXIS=SIZE with AXIS among data, fsdp, tensor (e.g. 'data=2,tensor=4').")
        axes.append(name)
        sizes.append(int(size))
    total = jax.device_count()
    if sizes.count(-1) > 1:
        raise TrainError(f"mesh: {spec!r} has more than one -1 size.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if total % known:
            raise TrainError(f"mesh: {spec!r}: {total} devices are not divisible by {known}.")
        sizes[sizes.index(-1)] = total // known
    if int(np.prod(sizes)) != total:
        raise TrainError(f"mesh: {spec!r} has {int(np.prod(sizes))} devices, but {total} are available (all processes).")
    return tuple(sizes), tuple(axes)


def _load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise TrainError(f"no tokenizer at {file}; pass --tokenizer with a tokenizer.json.")
    return Tokenizer.from_file(str(file)), file.parent


def _load_model(config: TrainConfig, mesh):
    """The model (float32 master weights, placed on `mesh`), its tokenizer and where the
    tokenizer files came from."""
    if config.model_config is not None:
        path = Path(config.model_config)
        folder = path if path.is_dir() else path.parent
        if not (folder / "config.json").exists():
            raise TrainError(f"model_config: {folder / 'config.json'} does not exist.")
        if path.is_file() and path.name != "config.json":
            raise TrainError(f"model_config: expected a file named config.json or its folder, got {path}.")
        model_config = checkpoint.load_config(folder)
        from ..models import lookup

        cls = lookup(model_config.model_type)[1]
        model = cls(model_config, key=jax.random.key(config.seed))
        model = jax.tree.map(lambda x: x.astype(jnp.float32) if eqx.is_inexact_array(x) else x, model)
        model = sharding.shard(model, mesh)
        tokenizer_source = Path(config.tokenizer) if config.tokenizer else folder
    else:
        folder = checkpoint.resolve(config.model or "eqxlm/default", revision=config.revision)
        model = checkpoint.from_pretrained(folder, dtype=jnp.float32, mesh=mesh)
        tokenizer_source = Path(config.tokenizer) if config.tokenizer else folder
    tokenizer, tokenizer_folder = _load_tokenizer(tokenizer_source)
    return model, tokenizer, tokenizer_folder


def _special_tokens(model) -> tuple[int | None, int]:
    gen = model.generation_config
    eos = gen.eos_token_id[0] if gen is not None and gen.eos_token_id else model.config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    bos = gen.bos_token_id if gen is not None and gen.bos_token_id is not None else model.config.bos_token_id
    if eos is None:
        raise TrainError("the model names no EOS token (generation_config.json / config.json eos_token_id); packing needs one.")
    return bos, int(eos)


def model_identity(model) -> dict:
    """What a checkpoint must match: architecture, config and every parameter's shape."""
    return {
        "architecture": f"{type(model).__name__} ({model.config.model_type})",
        "config": json.loads(json.dumps(model.config.to_hf(), default=str)),
        "parameters": {name: list(leaf.shape) for name, leaf in state_dict(model).items()},
    }


def _identity_mismatch(saved: dict, now: dict) -> str | None:
    if saved["architecture"] != now["architecture"]:
        return f"it holds a {saved['architecture']}, the model being trained is a {now['architecture']}"
    for name in sorted(set(saved["parameters"]) | set(now["parameters"])):
        a, b = saved["parameters"].get(name), now["parameters"].get(name)
        if a != b:
            return f"parameter {name}: checkpoint {a}, model {b}"
    config_diff = [k for k in sorted(set(saved["config"]) | set(now["config"])) if saved["config"].get(k) != now["config"].get(k)]
    if config_diff:
        k = config_diff[0]
        return f"config field {k}: checkpoint {saved['config'].get(k)!r}, model {now['config'].get(k)!r}"
    return None


# -- checkpoints -------------------------------------------------------------------------------
def complete_steps(ckpt_dir: Path) -> list[int]:
    """Steps with a finished checkpoint. Orbax writes a step into `N.orbax-checkpoint-tmp-*`
    and, once every process is done (its finalize), writes `commit_success.txt` and renames the
    folder to `N` (on object stores, which cannot rename, the marker alone commits it). A
    temporary folder, or an `N/` without the marker, is a half-written step and never counts."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit() and (p / "commit_success.txt").is_file())


def _manager(ckpt_dir: Path, config: TrainConfig):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints,
        enable_async_checkpointing=config.async_checkpointing,
        create=True,
        cleanup_tmp_directories=True,  # half-written steps of a killed run
    )
    return ocp.CheckpointManager(ckpt_dir, options=options, item_names=("state", "data", "meta"))


# -- the step ----------------------------------------------------------------------------------
def _cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_step(
    static,
    optimizer,
    *,
    compute_dtype,
    remat: bool,
    param_shardings,
    opt_shardings,
    fixed_order_over: NamedSharding | None = None,
):
    """The jitted optimiser step on `(accum, micro, seq)` token windows: summed token losses
    and gradients over the micro-batches (`lax.scan`), divided by the token count, clipped and
    applied by `optimizer`. **Returns:** `step(params, opt_state, key, frozen, batch) ->
    (params, opt_state, key, loss, grad_norm)`.

    `fixed_order_over` (the sharding of a `(shards,)` vector over the mesh's batch axes):
    each batch shard's loss and gradient are computed on their own (`vmap` over shards),
    gathered (exact) and summed in shard order, instead of XLA's all-reduce, whose summation
    order depends on the collective's implementation (in-process vs gloo/NCCL across
    processes). Then a data-parallel run is bitwise the same on any process layout, for the
    memory of `shards` gradients per device."""

    def loss_sums(params, frozen, ids):
        model = eqx.combine(_cast_floats(params, compute_dtype), _cast_floats(frozen, compute_dtype), static)
        model = remat_layers(model) if remat else model
        total, count = jax.vmap(next_token_loss, in_axes=(None, 0, None))(model, ids, None)
        return jnp.sum(total), jnp.sum(count)

    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)
    if fixed_order_over is not None:
        mesh = fixed_order_over.mesh
        gathered_vec = NamedSharding(mesh, P(None))
        gathered_grads = jax.tree.map(lambda sh: NamedSharding(mesh, P(None, *sh.spec)), param_shardings)
        grad_fn = _in_shard_order(grad_fn, fixed_order_over, ((gathered_vec, gathered_vec), gathered_grads))

    def step(params, opt_state, key, frozen, batch):
        def body(carry, ids):
            grads, total, count = carry
            (t, c), g = grad_fn(params, frozen, ids)
            return (jax.tree.map(jnp.add, grads, g), total + t, count + c), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, total, count), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)), batch)
        grads = jax.tree.map(lambda g: g / count, grads)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int step counts and floats
            updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params = jax.lax.with_sharding_constraint(params, param_shardings)
        opt_state = jax.lax.with_sharding_constraint(opt_state, opt_shardings)
        key = jax.random.split(key)[0]  # carried for stochastic layers; eqxlm's models draw nothing today
        return params, opt_state, key, total / count, optax.tree.norm(grads)

    return jax.jit(step, donate_argnums=(0, 1, 2))


def make_eval(static, *, compute_dtype, fixed_order_over: NamedSharding | None = None):
    """The jitted held-out sums on `(rows, seq)` token windows and their 0/1 mask.
    **Returns:** `sums(params, frozen, ids, mask) -> (summed token losses, token count)`;
    `fixed_order_over` as in `make_step`, so the held-out loss is bitwise the same on any
    process layout too."""

    def sums(params, frozen, ids, mask):
        model = eqx.combine(_cast_floats(params, compute_dtype), _cast_floats(frozen, compute_dtype), static)
        total, count = jax.vmap(next_token_loss, in_axes=(None, 0, 0))(model, ids, mask.astype(bool))
        return jnp.sum(total), jnp.sum(count)

    if fixed_order_over is not None:
        gathered_vec = NamedSharding(fixed_order_over.mesh, P(None))
        sums = _in_shard_order(sums, fixed_order_over, (gathered_vec, gathered_vec))
    return jax.jit(sums)


def _in_shard_order(fn, over: NamedSharding, gathered):
    """`fn(params, frozen, *rows)`, a sum over rows, computed on each batch shard's rows on
    their own (`vmap` over shards), gathered (exact) and summed in shard order: the same
    additions in the same order on any process layout. `over`: the sharding of a `(shards,)`
    vector over the batch axes; `gathered`: shardings of `fn`'s outputs with a leading shard
    axis, replicated along it."""
    mesh, (axes,) = over.mesh, over.spec
    shard_count = int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))

    def split(x):  # (rows, ...) -> (shards, rows per shard, ...), each shard on its own devices
        x = x.reshape(shard_count, -1, *x.shape[1:])
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(axes, *(None,) * (x.ndim - 1))))

    def summed(params, frozen, *rows):
        per_shard = jax.vmap(fn, in_axes=(None, None, *(0,) * len(rows)))(params, frozen, *map(split, rows))
        per_shard = jax.lax.with_sharding_constraint(per_shard, gathered)
        return jax.tree.map(lambda x: jnp.sum(x, axis=0), per_shard)

    return summed


# -- the run -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """What `run_training` returns: the run folder, the metrics rows, where the model was exported."""

    output_dir: Path
    history: list[dict]
    export_dir: Path | None
    final_step: int


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def _read_rows(path: Path) -> list[dict]:
    """Metrics rows; a last line cut short by a killed process is dropped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def _gather(tree):
    """Every process gets full numpy copies of a tree of (possibly cross-process) arrays."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def run_training(config: TrainConfig, *, trainable=eqx.is_array) -> Run:
    """Run (or resume) a training job: what `eqxlm train` does. See `TrainConfig` for the
    options. (`eqxlm.training.fit` is the small in-memory loop of the notebooks.)

    `trainable` is an `eqx.partition` filter spec choosing the leaves that are trained (a
    callable on leaves, or a pytree of bools shaped like the model); default every array
    (full fine-tuning). The others stay frozen, are not in the optimiser state and are not
    checkpointed (they are re-read from `model` when resuming). LoRA adapters will plug in
    here: wrap the model's layers and pass a filter that selects only the adapter weights.
    """
    config.check()
    try:
        import grain  # noqa: F401
        import orbax.checkpoint  # noqa: F401
    except ImportError as e:
        raise ImportError(f"eqxlm.train needs the train extra (pip install 'eqxlm[train]'): {e}") from None
    _init_distributed(config)
    out = Path(config.output_dir).absolute()  # Orbax wants absolute paths
    steps_done = _check_run_folder(config, out)
    job = _prepare(config, out, trainable)  # every check passed: nothing computed or written yet
    manager, start = _restore(config, out, job, steps_done)
    history = _open_run_folder(config, out, job, start)
    if manager is None:
        manager = _manager(out / "checkpoints", config)
    _train_steps(config, out, job, manager, start, history)
    export_dir = _export(config, out, job) if config.export else None
    if jax.process_index() == 0 and config.plot:
        plot_losses(history, out / "loss.png")
    return Run(output_dir=out, history=history, export_dir=export_dir, final_step=config.steps)


def _check_run_folder(config: TrainConfig, out: Path) -> list[int]:
    """A new run needs an empty folder; a resume needs the same options. **Returns:** the
    complete checkpoints' steps."""
    ckpt_dir = out / "checkpoints"
    steps_done = complete_steps(ckpt_dir)
    saved_config_path = out / "train_config.json"
    if not config.resume:
        if out.exists() and any(out.iterdir()):
            raise TrainError(
                f"output_dir {out} is not empty; pass --resume to continue the run in it, or choose a new folder "
                "(nothing was changed)."
            )
    elif saved_config_path.exists():
        diffs = config.changed_from(json.loads(saved_config_path.read_text()))
        if diffs:
            raise TrainError(f"cannot resume {out} with changed options (nothing was changed):\n  " + "\n  ".join(diffs))
    elif steps_done:
        raise TrainError(f"{ckpt_dir} has checkpoints but {saved_config_path} is missing: not an eqxlm run folder.")
    return steps_done


@dataclasses.dataclass
class _Job:
    """What a run computes with, built and checked by `_prepare` before anything is written;
    `params`, `opt_state` and `key` are replaced by every step."""

    mesh: jax.sharding.Mesh
    batch_axes: tuple[str, ...]
    micro: int  # sequences per micro-batch, over all processes
    static: object
    frozen: object
    params: object
    opt_state: object
    key: jax.Array
    optimizer: optax.GradientTransformation
    param_shardings: object
    opt_shardings: object
    batches: object  # this process's rows of each global batch (a checkpointable Grain iterator)
    rows: list[int]
    batch_shape: tuple[int, int, int]
    batch_spec: NamedSharding
    eval_windows: np.ndarray
    eval_mask: np.ndarray
    tokenizer_folder: Path
    identity: dict


def _prepare(config: TrainConfig, out: Path, trainable) -> _Job:
    """Data, mesh, model and initial state, each checked before anything is computed or written."""
    docs = read_documents(config.data, config.text_field)
    shape, axes = parse_mesh(config.mesh)
    mesh = sharding.make_mesh(shape, axes)
    batch_axes = tuple(a for a in sharding.BATCH_AXES if a in mesh.shape)
    batch_ways = int(np.prod([mesh.shape[a] for a in batch_axes])) if batch_axes else 1
    micro = config.batch_size // config.grad_accum
    if micro % batch_ways:
        raise TrainError(
            f"batch_size {config.batch_size} / grad_accum {config.grad_accum} = {micro} sequences per micro-batch, "
            f"which the mesh's batch axes ({' x '.join(f'{a}={mesh.shape[a]}' for a in batch_axes)} = {batch_ways} ways) "
            "cannot divide evenly."
        )
    model, tokenizer, tokenizer_folder = _load_model(config, mesh)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and config.seq_len > limit:
        raise TrainError(f"seq_len {config.seq_len} exceeds the model's max_position_embeddings ({limit}).")
    identity = model_identity(model)
    meta_path = out / "model_identity.json"
    if config.resume and meta_path.exists():
        problem = _identity_mismatch(json.loads(meta_path.read_text()), identity)
        if problem:
            raise TrainError(f"{out} holds a checkpoint of a different model ({problem}); nothing was changed.")
    windows, eval_windows, eval_mask = _pack_documents(config, docs, tokenizer, model)
    params, rest = eqx.partition(model, trainable)
    frozen, static = eqx.partition(rest, eqx.is_array)
    del model, rest
    optimizer, opt_state, param_shardings, opt_shardings, key = _initial_state(config, params, mesh)
    batch_shape = (config.grad_accum, micro, config.seq_len)
    batch_spec = NamedSharding(mesh, P(None, batch_axes or None, None))
    rows = process_rows(batch_spec, batch_shape, dim=1)
    picked = [a * micro + r for a in range(config.grad_accum) for r in rows]
    return _Job(
        mesh=mesh,
        batch_axes=batch_axes,
        micro=micro,
        static=static,
        frozen=frozen,
        params=params,
        opt_state=opt_state,
        key=key,
        optimizer=optimizer,
        param_shardings=param_shardings,
        opt_shardings=opt_shardings,
        batches=train_iterator(windows, batch_size=config.batch_size, seed=config.seed, rows=picked),
        rows=rows,
        batch_shape=batch_shape,
        batch_spec=batch_spec,
        eval_windows=eval_windows,
        eval_mask=eval_mask,
        tokenizer_folder=tokenizer_folder,
        identity=identity,
    )


def _pack_documents(config: TrainConfig, docs: list[str], tokenizer, model):
    """The training windows, and the held-out windows with their mask (the tail padded)."""
    bos, eos = _special_tokens(model)
    train_docs, eval_docs = split_documents(docs, config.eval_fraction, config.seed)
    windows, _ = pack(token_stream(tokenizer, train_docs, bos=bos, eos=eos), config.seq_len, pad_tail=False)
    if len(windows) == 0:
        raise DataError(
            f"the training documents make {sum(len(tokenizer.encode(d).ids) for d in train_docs)} tokens, "
            f"fewer than one sequence of seq_len={config.seq_len}."
        )
    eval_windows, eval_mask = pack(token_stream(tokenizer, eval_docs, bos=bos, eos=eos), config.seq_len, pad_tail=True)
    return windows, eval_windows, eval_mask


def _initial_state(config: TrainConfig, params, mesh):
    """The optimiser, its state laid out like the parameters, both layouts and the RNG key."""
    optimizer = make_optimizer(
        config.learning_rate,
        total_steps=config.steps,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        b1=config.adam_b1,
        b2=config.adam_b2,
    )
    replicated = NamedSharding(mesh, P())
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    with jax.numpy_dtype_promotion("standard"):
        # Moments take their parameter's layout; counts and other scalars are replicated.
        opt_shardings = optax.tree_map_params(
            optimizer,
            lambda _, s: s,
            jax.eval_shape(optimizer.init, params),
            param_shardings,
            transform_non_params=lambda _: replicated,
        )
        opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    key = jax.device_put(jax.random.key_data(jax.random.key(config.seed)), replicated)
    return optimizer, opt_state, param_shardings, opt_shardings, key


def _restore(config: TrainConfig, out: Path, job: _Job, steps_done: list[int]):
    """On resume, the latest complete checkpoint's state and data position, into `job`.
    **Returns:** `(manager or None, the step restored or 0)`."""
    if not (config.resume and steps_done):
        return None, 0
    import grain
    import orbax.checkpoint as ocp

    ckpt_dir = out / "checkpoints"
    manager = _manager(ckpt_dir, config)
    start = steps_done[-1]
    target = {"params": job.params, "opt_state": job.opt_state, "key": job.key}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = manager.restore(
        start,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=grain.checkpoint.CheckpointRestore(job.batches),
            meta=ocp.args.JsonRestore(),
        ),
    )
    job.params, job.opt_state, job.key = restored.state["params"], restored.state["opt_state"], restored.state["key"]
    if restored.meta["step"] != start or job.batches.get_state()["next_index"] != start:
        raise TrainError(f"checkpoint {ckpt_dir / str(start)} is inconsistent: meta step {restored.meta['step']}.")
    return manager, start


def _open_run_folder(config: TrainConfig, out: Path, job: _Job, start: int) -> list[dict]:
    """Write the run folder's config, model identity and metrics up to `start`, once every
    process has passed the checks (else a slower process would find the folder already
    written and refuse it). **Returns:** the history kept."""
    metrics_path = out / "metrics.jsonl"
    history: list[dict] = []
    if metrics_path.exists():  # keep what the restored step had logged; drop what came after it
        history = [r for r in _read_rows(metrics_path) if r["step"] <= start]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("eqxlm.train: checks passed")
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "train_config.json", config.to_json())
        _write_json(out / "model_identity.json", job.identity)
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
    return history


def _fixed_order_over(config: TrainConfig, job: _Job) -> NamedSharding | None:
    """`make_step`'s and `make_eval`'s `fixed_order_over` for `--fixed-order-reductions`."""
    return NamedSharding(job.mesh, P(job.batch_axes)) if config.fixed_order_reductions and job.batch_axes else None


def _evaluator(config: TrainConfig, job: _Job):
    """`evaluate(params) -> {"eval_loss", "eval_perplexity", "eval_tokens"}` over the held-out
    windows, `micro` at a time (the last batch padded with masked rows)."""
    eval_fn = make_eval(
        job.static,
        compute_dtype=jnp.bfloat16 if config.mixed_precision else jnp.float32,
        fixed_order_over=_fixed_order_over(config, job),
    )
    eval_spec = NamedSharding(job.mesh, P(job.batch_axes or None, None))
    micro, eval_rows = job.micro, process_rows(eval_spec, (job.micro, config.seq_len), dim=0)

    def evaluate(params) -> dict:
        total = count = 0.0
        for i in range(0, len(job.eval_windows), micro):
            ids = np.zeros((micro, config.seq_len), np.int32)
            mask = np.zeros((micro, config.seq_len), np.int32)
            part = slice(i, min(i + micro, len(job.eval_windows)))
            ids[: part.stop - i], mask[: part.stop - i] = job.eval_windows[part], job.eval_mask[part]
            t, c = eval_fn(
                params,
                job.frozen,
                global_batch(ids[eval_rows], eval_rows, ids.shape, eval_spec, 0),
                global_batch(mask[eval_rows], eval_rows, mask.shape, eval_spec, 0),
            )
            total += float(t)
            count += float(c)
        loss = total / max(count, 1.0)
        return {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 80.0))), "eval_tokens": int(count)}

    return evaluate


def _train_steps(config: TrainConfig, out: Path, job: _Job, manager, start: int, history: list[dict]) -> None:
    """Steps `start + 1 ... config.steps`: metrics rows, held-out evaluations and checkpoints
    as the options ask, appended to `history` (and metrics.jsonl)."""
    import grain
    import orbax.checkpoint as ocp

    is_main = jax.process_index() == 0
    step_fn = make_step(
        job.static,
        job.optimizer,
        compute_dtype=jnp.bfloat16 if config.mixed_precision else jnp.float32,
        remat=config.remat,
        param_shardings=job.param_shardings,
        opt_shardings=job.opt_shardings,
        fixed_order_over=_fixed_order_over(config, job),
    )
    evaluate = _evaluator(config, job)

    def log(row: dict) -> None:
        history.append(row)
        if is_main:
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")

    tokens_per_step = config.batch_size * config.seq_len
    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", disable=not (config.progress and is_main))
    began, began_step = time.perf_counter(), start
    for step in range(start + 1, config.steps + 1):
        local = next(job.batches).reshape(config.grad_accum, len(job.rows), config.seq_len)
        batch = global_batch(local, job.rows, job.batch_shape, job.batch_spec, 1)
        job.params, job.opt_state, job.key, loss, grad_norm = step_fn(job.params, job.opt_state, job.key, job.frozen, batch)
        bar.update()  # before the loss is shown, so the bar's count is the step that loss is of
        if step % config.log_every == 0 or step == config.steps:
            loss_value = float(loss)
            now = time.perf_counter()
            rate = (step - began_step) * tokens_per_step / (now - began) if now > began else float("nan")
            began, began_step = now, step  # tokens/s over the interval since the last row
            log(
                {
                    "step": step,
                    "loss": loss_value,
                    "grad_norm": float(grad_norm),
                    "learning_rate": float(optimizer_lr(config, step)),
                    "tokens": step * tokens_per_step,
                    "tokens_per_s": rate,
                }
            )
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{rate:,.0f}")
        if len(job.eval_windows) and ((config.eval_every and step % config.eval_every == 0) or step == config.steps):
            log({"step": step, **evaluate(job.params)})
        if step % config.save_every == 0 or step == config.steps:
            manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave({"params": job.params, "opt_state": job.opt_state, "key": job.key}),
                    data=grain.checkpoint.CheckpointSave(job.batches),
                    meta=ocp.args.JsonSave({"step": step, "train_config": config.to_json()}),
                ),
            )
    bar.close()
    manager.wait_until_finished()
    manager.close()


def _export(config: TrainConfig, out: Path, job: _Job) -> Path | None:
    """The trained model as a Hugging Face folder `out/export` with the tokenizer's files
    (written by process 0, which **returns** its path; the others return None)."""
    host_params, host_frozen = _gather(job.params), _gather(job.frozen)
    if jax.process_index() != 0:
        return None
    model = eqx.combine(jax.tree.map(jnp.asarray, host_params), jax.tree.map(jnp.asarray, host_frozen), job.static)
    export_dir = checkpoint.save_pretrained(model, out / "export")
    for name in TOKENIZER_FILES:
        if (job.tokenizer_folder / name).is_file():
            shutil.copy2(job.tokenizer_folder / name, export_dir / name)
    return export_dir


def optimizer_lr(config: TrainConfig, step: int) -> float:
    """The learning rate `make_optimizer`'s schedule applied at optimiser step `step` (1-based)."""
    warmup = max(1, config.steps // 20) if config.warmup_steps is None else config.warmup_steps
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup, max(config.steps, warmup + 1), end_value=config.learning_rate / 10
    )
    return float(schedule(step - 1))


def plot_losses(history: list[dict], path: Path) -> Path | None:
    """Training and held-out loss against steps as a PNG (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train_rows = [r for r in history if "loss" in r]
    eval_rows = [r for r in history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train", lw=1)
    if eval_rows:
        ax.plot([r["step"] for r in eval_rows], [r["eval_loss"] for r in eval_rows], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
