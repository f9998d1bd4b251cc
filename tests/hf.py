"""Helpers shared by the tests: tiny transformers checkpoints and torch -> eqxlm copies."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import eqxlm

TINY = {
    "llama": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
    "mistral": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=None,
    ),
    "bloom": dict(vocab_size=96, hidden_size=32, n_layer=2, n_head=4),
    "gemma": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    ),
    "gpt_neox": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    ),
    "gpt2": dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "qwen2": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
    "qwen3": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    ),
    "gemma2": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    ),
    "olmo2": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
    "granite": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
    "starcoder2": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
    "phi": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    ),
    "cohere": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
    "phi3": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=None,  # the default 32000 is outside the tiny vocabulary (an embedding padding_idx)
        eos_token_id=2,
    ),
    "mixtral": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "qwen3_moe": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=56,
        moe_intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_experts=4,
        num_experts_per_tok=2,
    ),
    "olmoe": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_experts=4,
        num_experts_per_tok=2,
        pad_token_id=1,
        eos_token_id=2,
    ),
    "qwen2_moe": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=56,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_experts=4,
        num_experts_per_tok=2,
    ),
    "gemma3_text": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    ),
}
CONFIGS = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "bloom": transformers.BloomConfig,
    "qwen2": transformers.Qwen2Config,
    "gemma": transformers.GemmaConfig,
    "gpt_neox": transformers.GPTNeoXConfig,
    "gpt2": transformers.GPT2Config,
    "qwen3": transformers.Qwen3Config,
    "gemma2": transformers.Gemma2Config,
    "olmo2": transformers.Olmo2Config,
    "granite": transformers.GraniteConfig,
    "starcoder2": transformers.Starcoder2Config,
    "phi": transformers.PhiConfig,
    "cohere": transformers.CohereConfig,
    "phi3": transformers.Phi3Config,
    "mixtral": transformers.MixtralConfig,
    "qwen3_moe": transformers.Qwen3MoeConfig,
    "olmoe": transformers.OlmoeConfig,
    "qwen2_moe": transformers.Qwen2MoeConfig,
    "gemma3_text": transformers.Gemma3TextConfig,
}


def hf_config(kind: str, **overrides):
    return CONFIGS[kind](**{**TINY[kind], **overrides})


def hf_model(kind: str, seed: int = 0, **overrides):
    """A tiny random transformers causal LM (eager attention, eval mode, float32).

    Weights are drawn with a larger std than HF's 0.02 init so that logits vary enough
    for parity checks to mean something."""
    return hf_model_from_config(hf_config(kind, **overrides), seed)


def hf_model_from_config(config, seed: int = 0):
    """`hf_model` for a ready transformers config object."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layernorm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def save_hf(model, path) -> str:
    model.save_pretrained(path)
    return str(path)


def to_jnp(t: torch.Tensor) -> jax.Array:
    return jnp.asarray(t.detach().float().numpy())


def copy_from_torch(ours, torch_module, prefix: str = "", key_map=None):
    """`ours` (a part or a whole model) with every parameter replaced by the torch
    parameter of the same name, through `key_map` (an `eqxlm.params.KeyMap`) when given."""
    from eqxlm.params import KeyMap, param_refs

    params = dict(torch_module.state_dict())
    leaves, treedef = jax.tree_util.tree_flatten(ours)
    new = list(leaves)
    for tensor in (key_map or KeyMap()).checkpoint_tensors(param_refs(ours)):
        source = params[prefix + tensor.name].detach().float().numpy()
        assert tuple(source.shape) == tensor.shape, (tensor.name, source.shape, tensor.shape)
        for ref, part in zip(tensor.parts, tensor.split(source), strict=True):
            assert not ref.index, "copy_from_torch takes unstacked layers"
            new[ref.leaf] = jnp.asarray(part).astype(leaves[ref.leaf].dtype)
    return jax.tree_util.tree_unflatten(treedef, new)


def float64_copy(model):
    """A float64 copy of a transformers model: the exact-arithmetic reference. Mixture-of-experts
    layers switch to the eager experts loop (torch's grouped matmul has no float64)."""
    exact = copy.deepcopy(model).double()
    if getattr(exact, "_can_set_experts_implementation", lambda: False)():
        exact.set_experts_implementation("eager")
    return exact


def run_hf(model, ids: np.ndarray, mask: np.ndarray | None = None, position_ids: np.ndarray | None = None, **kw):
    with torch.no_grad():
        return model(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=None if mask is None else torch.tensor(mask, dtype=torch.long),
            position_ids=None if position_ids is None else torch.tensor(position_ids, dtype=torch.long),
            **kw,
        )


def additive_mask(mask: np.ndarray) -> torch.Tensor:
    """A boolean `[q, k]` mask as transformers' 4-D additive float mask `[1, 1, q, k]`."""
    m = torch.tensor(np.asarray(mask))
    return torch.where(m, 0.0, torch.finfo(torch.float32).min)[None, None]


def tiny_mistral(seed: int = 0, **overrides) -> "eqxlm.DecoderLM":
    """A tiny random eqxlm Mistral (GQA, window 8) for tests that need no oracle."""
    fields = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        max_position_embeddings=128,
    )
    return eqxlm.DecoderLM(eqxlm.MistralConfig(**{**fields, **overrides}), key=jax.random.key(seed))


def hf_mask(q_len: int, kv_len: int, window: int | None = None, padding=None, q_offset: int = 0) -> np.ndarray:
    """transformers' own boolean mask `[q, kv]` from its `masking_utils` mask functions
    (`causal_mask_function`, `sliding_window_causal_mask_function`, `padding_mask_function`),
    evaluated on index grids: an oracle independent of eqxlm's `attention_mask`.
    `padding`: 1 = real key, one entry per key; `q_offset`: the first query's index."""
    from transformers import masking_utils as mu

    fns = [mu.causal_mask_function if window is None else mu.sliding_window_causal_mask_function(window)]
    if padding is not None:
        fns.append(mu.padding_mask_function(torch.tensor(np.asarray(padding), dtype=torch.bool)[None]))
    q = torch.arange(q_len)[:, None] + q_offset
    kv = torch.arange(kv_len)[None, :]
    return mu.and_masks(*fns)(torch.tensor(0), torch.tensor(0), q, kv).numpy()
