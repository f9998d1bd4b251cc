"""eqxlm: language models as small, shape-checked Equinox parts.

Layout: `eqxlm.nn` holds the parts, `eqxlm.models` the contract (`AbstractCausalLM`), the
Llama-like builder (`DecoderSpec`, `DecoderLM`) and one file per family, `eqxlm.params`
parameter names, key maps and partition specs, `eqxlm.checkpoint` Hugging Face import/export,
`eqxlm.generation` the KV-cached decoder, `eqxlm.training` training utilities (`fit`: a small in-memory loop),
`eqxlm.sharding` meshes and placement, `eqxlm.tokenizer` tokenizers and chat templates,
`eqxlm.chat` multi-turn chat with a kept KV cache, `eqxlm.harness` the lm-evaluation-harness
adapter (optional extra `eval`), `eqxlm.quantization` weight-only int8 / int4 quantization,
`eqxlm.cli` the command line.

Shape vocabulary (the one set of dimension names, used in every annotation; checked by
beartype at call time, and at trace time under jit). A dimension is named by the noun
(`kv_heads`); the number of its entries, as an argument or attribute, is `num_<noun>`
(`num_kv_heads`, Hugging Face's `num_key_value_heads`):

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
| `layers` | the leading axis of stacked (scanned) layers |

An `attention_mask` is always the 0/1 (or boolean) per-token mask of real tokens (1) and
padding (0), as in Hugging Face; the boolean query x key matrices built from it are `mask`.

Switch the runtime checks off with `EQXLM_TYPECHECK=0` in the environment (see
`eqxlm._typing`).
"""

from . import models, nn, params, sharding, training
from .checkpoint import CheckpointError, from_pretrained, hf_state_dict, save_pretrained
from .default import DEFAULT_MODEL, default_model_path
from .generation import SamplingConfig, generate
from .models import (
    AbstractCausalLM,
    BaseConfig,
    BloomConfig,
    CausalLMOutput,
    ConfigError,
    DecoderLM,
    DecoderSpec,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    ModelOutput,
    register,
    supported_model_types,
)
from .nn import Cache, KVCache
from .params import parameter_count, state_dict
from .quantization import QuantizedLinear, load_quantized, quantize, save_quantized
from .sharding import shard
from .tokenizer import load_tokenizer

__version__ = "0.1.0"


def scan_layers(model):
    """The same model with its layers stacked and run under `jax.lax.scan` (compile time
    flat in depth); parameter names and checkpoints are unchanged."""
    import equinox as eqx

    return eqx.tree_at(lambda m: m.model.layers, model, nn.LayerStack.from_layers(model.model.layers))


def unscan_layers(model):
    """The same model with its layers unrolled again (a tuple; see [`scan_layers`][])."""
    import equinox as eqx

    layers = model.model.layers
    return model if not isinstance(layers, nn.LayerStack) else eqx.tree_at(lambda m: m.model.layers, model, layers.unstack())


def __getattr__(name: str):
    """Every registered family's config by class name (`eqxlm.Qwen2Config`), so adding a
    family needs no line here."""
    from .models._registry import _REGISTRY

    for config_class, _ in _REGISTRY.values():
        if config_class.__name__ == name:
            return config_class
    raise AttributeError(f"module 'eqxlm' has no attribute {name!r}")


__all__ = [
    "AbstractCausalLM",
    "BaseConfig",
    "BloomConfig",
    "Cache",
    "CausalLMOutput",
    "CheckpointError",
    "ConfigError",
    "DEFAULT_MODEL",
    "DecoderLM",
    "DecoderSpec",
    "GenerationConfig",
    "KVCache",
    "LlamaConfig",
    "MistralConfig",
    "ModelOutput",
    "QuantizedLinear",
    "SamplingConfig",
    "default_model_path",
    "from_pretrained",
    "generate",
    "hf_state_dict",
    "load_quantized",
    "load_tokenizer",
    "models",
    "nn",
    "parameter_count",
    "params",
    "quantize",
    "register",
    "save_pretrained",
    "save_quantized",
    "scan_layers",
    "shard",
    "sharding",
    "state_dict",
    "supported_model_types",
    "training",
    "unscan_layers",
]
