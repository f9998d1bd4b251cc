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
    # not on the first case, so its logits stay large), attention_bias, MHA and an untied head.
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
    # Granite: all four scalars off their defaults (embeddings x1.5, scores x0.25 instead of
    # 8 ** -0.5, residual branches x0.7, logits / 3); the defaults (all 1: unscaled scores) tied.
    "granite": (
        "granite",
        {"embedding_multiplier": 1.5, "attention_multiplier": 0.25, "residual_multiplier": 0.7, "logits_scaling": 3.0},
    ),
    "granite-defaults-tied": ("granite", {"tie_word_embeddings": True}),
    # StarCoder2: LayerNorm with bias (random, non-zero), plain gelu_pytorch_tanh MLP, biases on
    # q/k/v/o and c_fc/c_proj, GQA (4 heads on 2), a window of 3 (shorter than the sequences),
    # tied head; no biases and no window, untied.
    "starcoder2": ("starcoder2", {"sliding_window": 3}),
    "starcoder2-nobias-untied": ("starcoder2", {"use_bias": False, "tie_word_embeddings": False}),
    # Phi: parallel attention + MLP from one LayerNorm, rotary on 50% of each head (the default),
    # biases on q/k/v/dense, fc1/fc2 and lm_head, per-head q/k LayerNorms (random weights and
    # biases); GQA (4 heads on 2) without q/k norms and with 25% rotary.
    "phi": ("phi", {"qk_layernorm": True}),
    "phi-gqa-quarter-rotary": (
        "phi",
        {
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        },
    ),
    # Cohere: parallel attention + SwiGLU from one bias-free LayerNorm (random weights),
    # interleaved rotary, per-head-weighted q/k norms (random (heads, head_dim) weights), GQA,
    # logits x 0.5 (a default 0.0625 would squash the logits below the test's scale), tied head;
    # then no q/k norms, untied, with attention biases.
    "cohere": ("cohere", {"use_qk_norm": True, "logit_scale": 0.5}),
    "cohere-untied-bias": ("cohere", {"tie_word_embeddings": False, "attention_bias": True, "logit_scale": 0.75}),
    # Phi-3: fused qkv_proj (GQA: 4 query heads, 2 kv heads) and gate_up_proj; rotary on half of
    # each head; longrope with original_max_position_embeddings 2, so every call of the tests
    # (3+ tokens) uses long_factor, with the derived attention factor sqrt(1 + ln(256/2) / ln 2);
    # a window of 3 shorter than the sequences.
    "phi3": (
        "phi3",
        {
            "original_max_position_embeddings": 2,
            "sliding_window": 3,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.3, 1.9],
                "long_factor": [2.5, 7.0],
            },
        },
    ),
    # longrope below the switch point (original 64 > every test length): short_factor with the
    # attention factor of factor 256 / 64; full rotary, no window.
    "phi3-longrope-short": (
        "phi3",
        {
            "original_max_position_embeddings": 64,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.5, 2.0, 3.0, 5.0],
                "long_factor": [4.0, 4.0, 8.0, 9.0],
            },
        },
    ),
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
