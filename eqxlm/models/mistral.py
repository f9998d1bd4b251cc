"""Mistral: Llama's recipe with a sliding-window attention mask and no projection biases.

The classes below differ from Llama's only by their config type; the computation is
`llama.py`'s. `sliding_window: null` (Mistral v0.2+) means full causal attention.
"""

import dataclasses
from typing import ClassVar

from .llama import _LLAMA_FAMILY_FIELDS, LlamaConfig, LlamaForCausalLM, LlamaModel


@dataclasses.dataclass(frozen=True, kw_only=True)
class MistralConfig(LlamaConfig):
    """Mistral's configuration (`transformers.MistralConfig` names and defaults).

    Unlike Llama's, it has `sliding_window` (default 4096; null = none) and no
    `attention_bias` / `mlp_bias` fields (transformers' Mistral has no biases, so eqxlm
    refuses a config that asks for them).
    """

    model_type: ClassVar[str] = "mistral"
    architecture: ClassVar[str] = "MistralForCausalLM"
    hf_fields: ClassVar[dict[str, str]] = {**_LLAMA_FAMILY_FIELDS, "sliding_window": "sliding_window"}
    ignored_fields: ClassVar[frozenset[str]] = frozenset()

    intermediate_size: int = 14336
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 4096 * 32
    sliding_window: int | None = 4096


class MistralModel(LlamaModel):
    """The Mistral decoder without a head (`MistralModel`)."""

    config_class: ClassVar[type] = MistralConfig


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral with its language-model head (`MistralForCausalLM`)."""

    config_class: ClassVar[type] = MistralConfig
    base_model_class: ClassVar[type] = MistralModel
