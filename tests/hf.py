"""Helpers shared by the tests: tiny transformers checkpoints and torch -> eqxlm copies."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import eqxlm
from eqxlm.checkpoint import _path_name

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
}
CONFIGS = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "bloom": transformers.BloomConfig}


def hf_config(kind: str, **overrides):
    return CONFIGS[kind](**{**TINY[kind], **overrides})


def hf_model(kind: str, seed: int = 0, **overrides):
    """A tiny random transformers causal LM (eager attention, eval mode, float32).

    Weights are drawn with a larger std than HF's 0.02 init so that logits vary enough
    for parity checks to mean something."""
    torch.manual_seed(seed)
    config = hf_config(kind, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layernorm" in name or name.startswith("transformer.ln_f"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def save_hf(model, path) -> str:
    model.save_pretrained(path)
    return str(path)


def to_jnp(t: torch.Tensor) -> jax.Array:
    return jnp.asarray(t.detach().float().numpy())


def copy_from_torch(ours, torch_module, prefix: str = ""):
    """`ours` with every array leaf replaced by the torch parameter of the same name."""
    params = {k: v for k, v in torch_module.state_dict().items()}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(ours)
    new = []
    for path, leaf in leaves:
        if isinstance(leaf, jax.Array):
            name = prefix + _path_name(path)
            tensor = params[name]
            assert tuple(tensor.shape) == leaf.shape, (name, tensor.shape, leaf.shape)
            new.append(to_jnp(tensor).astype(leaf.dtype))
        else:
            new.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, new)


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


def tiny_mistral(seed: int = 0, **overrides) -> "eqxlm.MistralForCausalLM":
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
    return eqxlm.MistralForCausalLM(eqxlm.MistralConfig(**{**fields, **overrides}), key=jax.random.key(seed))
