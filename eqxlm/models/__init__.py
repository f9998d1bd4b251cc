"""Models: the contract, the Llama-like builder, and one file per family.

- `_contract.py`: [`AbstractCausalLM`][], the one interface every tool is written against.
- `_builder.py`: [`DecoderSpec`][] (a family's choices) and [`DecoderLM`][] (builds any spec).
- `_config.py`: `BaseConfig`, the strict `config.json` reader every family config uses.
- `_registry.py`: `model_type` -> (config class, model class).
- `<family>.py`: a config with Hugging Face field names, its spec and key map.

The registry, one line per family (importing a family file registers it):
"""

from . import bloom as bloom
from . import cohere as cohere
from . import gemma as gemma
from . import gemma2 as gemma2
from . import gpt2 as gpt2
from . import gpt_neox as gpt_neox
from . import granite as granite
from . import llama as llama
from . import mistral as mistral
from . import mixtral as mixtral
from . import olmo2 as olmo2
from . import olmoe as olmoe
from . import phi as phi
from . import phi3 as phi3
from . import qwen2 as qwen2
from . import qwen2_moe as qwen2_moe
from . import qwen3 as qwen3
from . import qwen3_moe as qwen3_moe
from . import starcoder2 as starcoder2
from ._builder import Decoder, DecoderLM, DecoderSpec, NormSpec, RopeSpec
from ._config import BaseConfig, ConfigError
from ._contract import AbstractCausalLM, CausalLMOutput, GenerationConfig, ModelOutput, broadcast_cache
from ._registry import families_table, lookup, register, supported_model_types
from .bloom import BloomConfig
from .llama import LlamaConfig
from .mistral import MistralConfig

__all__ = [
    "AbstractCausalLM",
    "BaseConfig",
    "BloomConfig",
    "CausalLMOutput",
    "ConfigError",
    "Decoder",
    "DecoderLM",
    "DecoderSpec",
    "GenerationConfig",
    "LlamaConfig",
    "MistralConfig",
    "ModelOutput",
    "NormSpec",
    "RopeSpec",
    "broadcast_cache",
    "families_table",
    "lookup",
    "register",
    "supported_model_types",
]
