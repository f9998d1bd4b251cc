"""Run by tests/test_families.py in a fresh process with 8 simulated CPU devices: for the
richest case of every family in `tests/families.py`, logits of the model placed by
`eqxlm.shard` (and loaded with `from_pretrained(mesh=...)`) on an fsdp x tensor mesh against
one device. Writes what it measured as JSON (the test asserts)."""

import json
import sys
import tempfile

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from families import CASES
from hf import hf_model

import eqxlm
from eqxlm import sharding

assert jax.device_count() == 8, jax.devices()


def main(out_path, names):
    results = {}
    forward = eqx.filter_jit(lambda m, i: jax.vmap(m)(i).logits)
    mesh = sharding.make_mesh((2, 4), ("fsdp", "tensor"))
    for name in names:
        family, overrides = CASES[name]
        ref = hf_model(family, **overrides)
        folder = tempfile.mkdtemp()
        ref.save_pretrained(folder)
        ids = jnp.asarray(np.random.default_rng(0).integers(0, ref.config.vocab_size, size=(4, 10)), jnp.int32)
        single = eqxlm.from_pretrained(folder)
        want = np.asarray(forward(single, ids))
        entry = {}
        for how, model in (
            ("shard", lambda: eqxlm.shard(single, mesh)),
            ("from_pretrained", lambda: eqxlm.from_pretrained(folder, mesh=mesh)),
        ):
            try:
                placed = model()
            except sharding.ShardingError as e:  # a tiny shape the rules cannot split: say so
                entry[how] = {"error": str(e)}
                continue
            split = sum(
                1 for leaf in jax.tree.leaves(eqx.filter(placed, eqx.is_array)) if any(a is not None for a in leaf.sharding.spec)
            )
            got = np.asarray(forward(placed, sharding.shard_batch(ids, mesh)))
            entry[how] = {"max_diff": float(np.abs(got - want).max()), "scale": float(np.abs(want).max()), "split_leaves": split}
        results[name] = entry
    json.dump(results, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
