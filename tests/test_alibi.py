import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import PART_ATOL
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor

from eqxlm.models._builder import resolve_positions
from eqxlm.nn import ALiBi, alibi_slopes


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 112])
def test_slopes_match_hf_including_non_powers_of_two(heads):
    np.testing.assert_allclose(alibi_slopes(heads), _get_alibi_slopes(heads, "cpu").numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("heads", [4, 6, 12])
def test_bias_matches_build_alibi_tensor_with_left_padding(heads):
    mask = np.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    want = build_alibi_tensor(torch.tensor(mask), heads, torch.float32).reshape(2, heads, 7).numpy()
    for row in range(2):
        ids = jnp.zeros(7, jnp.int32)
        _, positions = resolve_positions(ids, jnp.asarray(mask[row], jnp.int32), None, None)
        got = ALiBi(heads)(positions)
        np.testing.assert_allclose(np.asarray(got), want[row], atol=PART_ATOL, rtol=0)
