"""eqxlm: language models (BLOOM, Mistral, Llama) as small, shape-checked Equinox parts.

Layout: `eqxlm.nn` holds the parts, `eqxlm.models` the models composed of them,
`eqxlm.checkpoint` Hugging Face import/export, `eqxlm.generation` the KV-cached decoder,
`eqxlm.training` training utilities, `eqxlm.tokenizer` tokenizers and chat templates,
`eqxlm.chat` multi-turn chat with a kept KV cache, `eqxlm.harness` the lm-evaluation-harness
adapter (optional extra `eval`), `eqxlm.cli` the command line.

Shape vocabulary (used in every annotation; checked by beartype at call time, and at
trace time under jit):

| dim | meaning |
|---|---|
| `seq` | tokens in the block being processed (queries) |
| `kv_seq` | keys attended to (the block, or the cache) |
| `cache` | entries of a KV cache |
| `batch` | sequences in a batch (only in `generate`; everything else takes one sequence and is batched with `jax.vmap`) |
| `hidden` | model width (`hidden_size`) |
| `heads`, `kv_heads` | query heads, key/value heads (`kv_heads` divides `heads`) |
| `head_dim` | width of one head |
| `intermediate` | MLP inner width |
| `vocab` | vocabulary size |

Switch the runtime checks off with `EQXLM_TYPECHECK=0` in the environment (see
`eqxlm._typing`).
"""

from . import models, nn, sharding
from .checkpoint import CheckpointError, from_pretrained, parameter_count, save_pretrained, state_dict
from .default import DEFAULT_MODEL, default_model_path
from .generation import generate
from .models import (
    BloomConfig,
    BloomForCausalLM,
    BloomModel,
    CausalLMOutput,
    ConfigError,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    MistralModel,
    ModelOutput,
)
from .nn import KVCache
from .sharding import shard
from .tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "BloomConfig",
    "BloomForCausalLM",
    "BloomModel",
    "CausalLMOutput",
    "CheckpointError",
    "ConfigError",
    "GenerationConfig",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "MistralConfig",
    "MistralForCausalLM",
    "MistralModel",
    "ModelOutput",
    "DEFAULT_MODEL",
    "default_model_path",
    "from_pretrained",
    "generate",
    "load_tokenizer",
    "models",
    "nn",
    "parameter_count",
    "save_pretrained",
    "shard",
    "sharding",
    "state_dict",
]
