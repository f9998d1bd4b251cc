"""Which layers slide, read from configs without `layer_types` (older Qwen2 files): eqxlm's
derivation from `max_window_layers` against the `layer_types` transformers derives itself.
(Configs that transformers 5 saves carry `layer_types`, so the family tests never take this path.)"""

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
    windows, types = config_class.from_hf(raw).windows_by_layer()
    assert list(types) == list(want)
    assert windows == tuple(3 if t == "sliding_attention" else None for t in want)
