"""Run by tests/test_loading.py in a fresh process with 8 simulated CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/loading_worker.py CASES.json OUT.json

CASES.json lists `[folder, requested dtype name or null]`. For each, the checkpoint is loaded
onto a (4 fsdp x 2 tensor) mesh, so each device reads its own box of every weight, and every
parameter is compared bit for bit with the safetensors library's own reading (torch), cast
to the dtype expected. Writes what it found as JSON (the test asserts)."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import torch
from safetensors.torch import load_file

import eqxlm
from eqxlm import sharding

assert jax.device_count() == 8, jax.devices()
TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BITS = {"float32": (torch.int32, np.int32), "bfloat16": (torch.int16, np.int16), "float16": (torch.int16, np.int16)}


def main(cases_path, out_path):
    mesh = sharding.make_mesh((4, 2), ("fsdp", "tensor"))
    results = {}
    for folder, requested, expected in json.loads(Path(cases_path).read_text()):
        reference = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            reference.update(load_file(f))
        model = eqxlm.from_pretrained(folder, dtype=requested, mesh=mesh)
        params = eqxlm.state_dict(model)
        torch_int, np_int = BITS[expected]
        equal = []
        for name, leaf in params.items():
            want = reference[name].to(TORCH[expected]).view(torch_int).numpy()
            equal.append(bool(np.array_equal(np.asarray(leaf).view(np_int), want)))
        results[f"{folder}|{requested}"] = {
            "all_equal": all(equal) and len(equal) == len(reference),
            "dtypes": sorted({str(leaf.dtype) for leaf in params.values()}),
            "sharded_2d": sum(len(leaf.sharding.device_set) == 8 and leaf.ndim == 2 for leaf in params.values()),
        }
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
