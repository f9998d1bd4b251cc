"""Models composed from `eqxlm.nn`: one file per family, each a short recipe.

`ARCHITECTURES` maps a `config.json` `model_type` to its config and causal-LM classes;
adding an architecture means adding a file and a line here (see the README's porting
guide).
"""

from ._common import CausalLMOutput, GenerationConfig, ModelOutput
from ._config import BaseConfig, ConfigError
from .bloom import BloomConfig, BloomForCausalLM, BloomModel
from .llama import LlamaConfig, LlamaForCausalLM, LlamaModel
from .mistral import MistralConfig, MistralForCausalLM, MistralModel

ARCHITECTURES: dict[str, tuple[type[BaseConfig], type]] = {
    "bloom": (BloomConfig, BloomForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}

CausalLM = BloomForCausalLM | LlamaForCausalLM | MistralForCausalLM

__all__ = [
    "ARCHITECTURES",
    "BaseConfig",
    "BloomConfig",
    "BloomForCausalLM",
    "BloomModel",
    "CausalLM",
    "CausalLMOutput",
    "ConfigError",
    "GenerationConfig",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "MistralConfig",
    "MistralForCausalLM",
    "MistralModel",
    "ModelOutput",
]
