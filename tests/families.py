"""The families the shared family tests (`test_families.py`) run, with the cases that switch
each distinctive feature on. A family joins by adding its tiny config to `hf.TINY` /
`hf.CONFIGS` and its cases here.

Each case: `(family, transformers config overrides)`. The first case of a family is its
richest; generation, export and scan checks run on it.
"""

CASES: dict[str, tuple[str, dict]] = {
    # Qwen2: q/k/v biases without an o bias (the test weights make every bias non-zero);
    # sliding windows (3, shorter than the sequences) from layer 1 on, full attention on layer 0.
    "qwen2-sliding": ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    # Gemma: (1 + w) RMSNorm (random weights around 1 make 1 + w differ from w), sqrt(hidden)
    # embedding scale, GeGLU, head_dim 16 != 32 / 4, tied head; an untied variant.
    "gemma": ("gemma", {}),
    "gemma-untied-mha": ("gemma", {"tie_word_embeddings": False, "num_key_value_heads": 4}),
    # GPT-NeoX: parallel residual with two norms, 25% and 50% partial rotary, per-head fused qkv;
    # the sequential variant.
    "gpt_neox": ("gpt_neox", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}),
    "gpt_neox-sequential": ("gpt_neox", {"use_parallel_residual": False}),
    # GPT-2: learned positions, Conv1D weights, fused c_attn, gelu_new, tied head; the scale options.
    "gpt2": ("gpt2", {}),
    "gpt2-scales": ("gpt2", {"scale_attn_by_inverse_layer_idx": True, "activation_function": "gelu_new"}),
    "gpt2-unscaled": ("gpt2", {"scale_attn_weights": False, "n_inner": 40}),
    # Mixtral: 4 experts, top-2 renormalised routing (router weights std 0.2: no near-ties),
    # a sliding window (3) shorter than the sequences; the full-attention, top-1 variant.
    "mixtral": ("mixtral", {"sliding_window": 3}),
    "mixtral-top1": ("mixtral", {"num_experts_per_tok": 1}),
    # Qwen3-MoE: per-head q/k RMSNorm (norm weights around 1), head_dim 16 != 32 / 4,
    # renormalised top-2 (`norm_topk_prob`), a dense MLP on layer 1 (`mlp_only_layers`) between
    # sparse layers; then unnormalised top-2, experts every second layer
    # (`decoder_sparse_step` 2: layer 1 sparse, 0 and 2 dense) and a sliding window of 3.
    "qwen3_moe": ("qwen3_moe", {"head_dim": 16, "norm_topk_prob": True, "mlp_only_layers": [1]}),
    # OLMoE: RMSNorm over the whole q and k projections, top-2 without renormalisation (the
    # default); then renormalised top-3.
    "olmoe": ("olmoe", {}),
    "olmoe-norm-top3": ("olmoe", {"norm_topk_prob": True, "num_experts_per_tok": 3}),
    # Qwen2-MoE: biased q/k/v, a shared expert with its sigmoid gate, unnormalised top-2, a dense
    # MLP on layer 2 (`mlp_only_layers`), sliding windows (3) on the layers `layer_types` marks;
    # then renormalised routing with experts every second layer (`decoder_sparse_step` 2).
    "qwen2_moe": (
        "qwen2_moe",
        {"mlp_only_layers": [2], "use_sliding_window": True, "sliding_window": 3, "max_window_layers": 3},
    ),
    "qwen2_moe-step": ("qwen2_moe", {"norm_topk_prob": True, "decoder_sparse_step": 2}),
    "qwen3_moe-step": ("qwen3_moe", {"decoder_sparse_step": 2, "use_sliding_window": True, "sliding_window": 3}),
}
