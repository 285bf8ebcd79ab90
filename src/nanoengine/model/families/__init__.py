"""Model families: what each `config.json` `model_type` is built from.

One module per family, each naming its `model_type` and its config and model classes. Llama
(`llama.py`) is the decoder itself; every other family subclasses its pieces and changes only
what differs, so that a reader sees at a glance what makes, say, Qwen2 differ from Llama.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ModelConfig, read_config
from ...errors import CheckpointError
from ..decoder import CausalLM
from . import gemma3, gpt2, llama, mistral, qwen2


@dataclass(frozen=True)
class Family:
    config_class: type[ModelConfig]
    model_class: type[CausalLM]


FAMILIES: dict[str, Family] = {m.MODEL_TYPE: Family(m.CONFIG, m.MODEL) for m in (llama, qwen2, mistral, gemma3, gpt2)}


def family(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise CheckpointError(f"config.json has model_type {model_type!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def load_config(folder: str | Path) -> ModelConfig:
    """The family's config for the checkpoint in `folder`."""
    raw = read_config(folder)
    return family(raw.get("model_type")).config_class.from_dict(raw)


def model_class(config: ModelConfig) -> type[CausalLM]:
    return family(config.model_type).model_class
