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
    # Qwen3: per-head q/k RMSNorm before rotary (random norm weights around 1), head_dim 16 !=
    # 32 / 4, attention_bias on q/k/v and o, sliding windows (3) from layer 1 on, untied head;
    # a tied variant without bias or windows.
    "qwen3-sliding-bias": (
        "qwen3",
        {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1, "attention_bias": True},
    ),
    "qwen3-tied": ("qwen3", {"tie_word_embeddings": True}),
    # Gemma 2: (1 + w) RMSNorm, four norms per layer, sqrt(hidden) embedding scale, tied head;
    # an attention soft-cap that binds (1.5), queries scaled by 8 ** -0.5 (not head_dim
    # 16 ** -0.5), layers sliding (window 3 < the sequences) / global alternating over 4 layers
    # (the scanned layout is one segment of period 2). Then a final soft-cap that binds (4.0;
    # not on the first case, whose scanned check compares at 1e-6 of the logits' size, which a
    # cap shrinks), attention_bias, MHA and an untied head.
    "gemma2-capped": ("gemma2", {"sliding_window": 3, "attn_logit_softcapping": 1.5, "query_pre_attn_scalar": 8}),
    "gemma2-untied-bias": (
        "gemma2",
        {"final_logit_softcapping": 4.0, "tie_word_embeddings": False, "attention_bias": True, "num_key_value_heads": 4},
    ),
    # OLMo-2: norms on the attention / MLP outputs only, q/k RMSNorm over the whole projection
    # (random weights around 1, per element, so a per-head norm would differ), GQA, untied; then
    # attention_bias on q/k/v and o with a tied head.
    "olmo2": ("olmo2", {}),
    "olmo2-bias-tied": ("olmo2", {"attention_bias": True, "tie_word_embeddings": True}),
    # Gemma 3 (text): Gemma 2's layout plus per-head (1 + w) q/k norms; six layers in the 5:1
    # sliding/global pattern (scanned: a segment of five, then one); sliding layers (window 4 <
    # the sequences) rotate with theta 10 and global ones with theta 100 and linear scaling 2
    # (either swapped for the other moves the logits); queries scaled by the default
    # query_pre_attn_scalar 256 ** -0.5 (not head_dim 16 ** -0.5). Then a final
    # soft-cap that binds (4.0) and an attention one (1.5) that transformers stores but never
    # applies (Gemma3Attention passes no softcap), attention_bias and an untied head.
    "gemma3_text-local-rope": (
        "gemma3_text",
        {
            "sliding_window": 4,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0},
            },
        },
    ),
    "gemma3_text-capped": (
        "gemma3_text",
        {"attn_logit_softcapping": 1.5, "final_logit_softcapping": 4.0, "tie_word_embeddings": False, "attention_bias": True},
    ),
}
