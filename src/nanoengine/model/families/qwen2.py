"""Qwen2: Llama with a bias on the q, k and v projections (none on o)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ModelConfig
from ...errors import CheckpointError
from ..decoder import Attention, CausalLM, Decoder, DecoderLayer, Linear


@dataclass(frozen=True)
class Qwen2Config(ModelConfig):
    @classmethod
    def fields_from(cls, raw: dict[str, Any]) -> dict[str, Any]:
        if raw.get("use_sliding_window"):
            raise CheckpointError("Qwen2 with use_sliding_window is not supported")
        return {**super().fields_from(raw), "attention_bias": True}


class Qwen2Attention(Attention):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.o_proj = Linear(self.n_head * self.head_dim, config.hidden_size, bias=False)


class Qwen2DecoderLayer(DecoderLayer):
    attention_class = Qwen2Attention


class Qwen2Decoder(Decoder):
    layer_class = Qwen2DecoderLayer


class Qwen2ForCausalLM(CausalLM):
    decoder_class = Qwen2Decoder


MODEL_TYPE = "qwen2"  # config.json's model_type
CONFIG = Qwen2Config
MODEL = Qwen2ForCausalLM
