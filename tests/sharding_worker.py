"""Run by tests/test_sharding.py in a fresh process with 8 simulated CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py OUT.json [ARCH-MESH ...]

For each architecture-mesh case named (default: all) it compares sharded against
single-device results, and it checks the error and memory estimate; it writes what it
measured as JSON (the test asserts)."""

import json
import sys
import tempfile

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import eqxlm
from eqxlm import sharding
from eqxlm.training import train_step

assert jax.device_count() == 8, jax.devices()

CONFIGS = {
    "llama": eqxlm.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
    ),
    "mistral": eqxlm.MistralConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        sliding_window=4,
        max_position_embeddings=128,
        initializer_range=0.2,
    ),
    "bloom": eqxlm.BloomConfig(vocab_size=96, hidden_size=32, n_layer=2, n_head=4, initializer_range=0.2),
}
MESHES = {
    "data8": ((8,), ("data",)),
    "data2_tensor4": ((2, 4), ("data", "tensor")),
    "fsdp4_tensor2": ((4, 2), ("fsdp", "tensor")),
}


def main(out_path, cases):
    results = {}
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 96, size=(8, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[3, :5] = 0
    for arch in [*CONFIGS, "llama-scanned"]:
        meshes = [m for m in MESHES if f"{arch}-{m}" in cases]
        if not meshes:
            continue
        config = CONFIGS[arch.split("-")[0]]
        scanned = arch.endswith("scanned")
        folder = eqxlm.save_pretrained(eqxlm.DecoderLM(config, key=jax.random.key(0)), tempfile.mkdtemp())
        single = eqxlm.from_pretrained(folder, scan_layers=scanned)
        forward = eqx.filter_jit(lambda m, i, k: jax.vmap(m)(i, k).logits)
        ref_logits = np.asarray(forward(single, ids, mask))
        ref_tokens = np.asarray(eqxlm.generate(single, ids, mask, max_new_tokens=10, eos_token_id=[]))
        opt = optax.sgd(0.1)
        with jax.numpy_dtype_promotion("standard"):
            state = opt.init(eqx.filter(single, eqx.is_array))
        ref_model, _, ref_loss = train_step(single, state, jnp.asarray(ids), optimizer=opt)
        for mesh_name in meshes:
            mesh = sharding.make_mesh(*MESHES[mesh_name])
            model = eqxlm.from_pretrained(folder, mesh=mesh, scan_layers=scanned)

            def as_promised(m):  # same placement (P() and P(None, None) are equivalent)
                promised = jax.tree.leaves(sharding.shardings(m, mesh))
                leaves = jax.tree.leaves(eqx.filter(m, eqx.is_array))
                return len(promised) == len(leaves) and all(
                    leaf.sharding.is_equivalent_to(want, leaf.ndim) for leaf, want in zip(leaves, promised, strict=True)
                )

            actual = {r.name: jax.tree.leaves(model)[r.leaf].sharding.spec for r in eqxlm.params.param_refs(model)}
            specs_ok = as_promised(model)
            placed_ok = as_promised(eqxlm.shard(single, mesh))
            sids, smask = sharding.shard_batch(ids, mesh), sharding.shard_batch(mask, mesh)
            logits = np.asarray(forward(model, sids, smask))
            real = mask.astype(bool)
            tokens = np.asarray(eqxlm.generate(model, ids, mask, max_new_tokens=10, eos_token_id=[], mesh=mesh))
            with jax.numpy_dtype_promotion("standard"):
                state = opt.init(eqx.filter(model, eqx.is_array))
            new_model, _, loss = train_step(model, state, sids, optimizer=opt, mesh=mesh)
            param_diff = max(
                float(jnp.abs(a - b).max())
                for a, b in zip(
                    jax.tree.leaves(eqx.filter(new_model, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(ref_model, eqx.is_array)),
                    strict=True,
                )
            )
            still_sharded = as_promised(new_model)
            results[f"{arch}-{mesh_name}"] = {
                "specs_ok": specs_ok,
                "placed_ok": placed_ok,
                "still_sharded": still_sharded,
                "logits_max_diff": float(np.abs(logits - ref_logits)[real].max()),
                "logits_scale": float(np.abs(ref_logits).max()),
                "tokens_equal": bool(np.array_equal(tokens, ref_tokens)),
                "loss_diff": abs(float(loss) - float(ref_loss)),
                "param_max_diff": param_diff,
                "memory": sharding.describe(model, mesh),
                "tensor_sharded_q": str(actual["model.layers.0.self_attn.q_proj.weight"]),
            }
    # A rule that does not divide a dimension names the parameter, the dimension and the axis.
    bad = eqxlm.LlamaConfig(
        vocab_size=96, hidden_size=36, intermediate_size=64, num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=6
    )
    try:
        eqxlm.shard(eqxlm.DecoderLM(bad, key=jax.random.key(0)), sharding.make_mesh((8,), ("tensor",)))
        results["indivisible_error"] = None
    except sharding.ShardingError as e:
        results["indivisible_error"] = str(e)
    # The memory estimate works on an abstract model (nothing allocated) and is exact.
    abstract = eqx.filter_eval_shape(lambda: eqxlm.DecoderLM(CONFIGS["llama"], key=jax.random.key(0)))
    concrete = eqxlm.DecoderLM(CONFIGS["llama"], key=jax.random.key(0))
    mesh = sharding.make_mesh((4, 2), ("fsdp", "tensor"))
    placed = eqxlm.shard(concrete, mesh)
    by_device = {}
    for leaf in jax.tree.leaves(eqx.filter(placed, eqx.is_array)):
        for shard in leaf.addressable_shards:
            by_device[shard.device] = by_device.get(shard.device, 0) + shard.data.nbytes
    estimate = sharding.memory_per_device(abstract, mesh)
    results["memory_estimate"] = {
        "estimate": estimate["bytes_per_device"],
        "measured_max": max(by_device.values()),
        "total": estimate["bytes_total"],
        "params_bytes": 4 * eqxlm.parameter_count(concrete),
    }
    json.dump(results, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    every = [f"{a}-{m}" for a in (*CONFIGS, "llama-scanned") for m in MESHES]
    main(sys.argv[1], sys.argv[2:] or every)
