"""Which layers slide, read from configs without `layer_types` (older Qwen2 files): eqxlm's
derivation from `max_window_layers` against the `layer_types` transformers derives itself.
(Configs that transformers 5 saves carry `layer_types`, so the family tests never take this path;
the Qwen2-MoE test deletes them from a saved config and compares logits.)"""

import pytest
import transformers

from eqxlm.models._registry import lookup


@pytest.mark.parametrize("max_window_layers", [0, 1, 2, 3])
def test_qwen2_windows_from_max_window_layers_match_transformers(max_window_layers):
    fields = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=3,
        max_window_layers=max_window_layers,
    )
    want = transformers.Qwen2Config(**fields).layer_types
    raw = {**transformers.Qwen2Config(**fields).to_dict(), "max_window_layers": max_window_layers}
    raw.pop("layer_types")
    config_class, _ = lookup("qwen2")
    config = config_class.from_hf(raw)
    windows, types = config.windows_by_layer(), config.types_by_layer()
    assert list(types) == list(want)
    assert windows == tuple(3 if t == "sliding_attention" else None for t in want)


def test_qwen2_moe_sliding_layers_without_layer_types_match_transformers_logits(tmp_path):
    """A Qwen2-MoE config without `layer_types`: transformers derives the sliding layers from
    `use_sliding_window`, `sliding_window` and `max_window_layers` (odd-numbered layers below
    `max_window_layers`: here layer 0 of 3 slides); eqxlm must slide the same ones. Window 3,
    sequences of 10: a layer sliding where it should not (or the reverse) moves the logits."""
    import json

    import jax
    import numpy as np
    from conftest import LOGITS_ATOL
    from hf import hf_model, run_hf, save_hf

    import eqxlm

    ref = hf_model("qwen2_moe", use_sliding_window=True, sliding_window=3, max_window_layers=2)
    assert ref.config.layer_types == ["sliding_attention", "full_attention", "full_attention"]
    folder = save_hf(ref, tmp_path / "qwen2_moe")
    config = json.loads((tmp_path / "qwen2_moe" / "config.json").read_text())
    del config["layer_types"]
    (tmp_path / "qwen2_moe" / "config.json").write_text(json.dumps(config))
    model = eqxlm.from_pretrained(folder)
    ids = np.random.default_rng(0).integers(0, 96, size=(2, 10))
    got = jax.vmap(model)(ids).logits
    np.testing.assert_allclose(np.asarray(got), run_hf(ref, ids).logits.numpy(), atol=LOGITS_ATOL, rtol=0)
