"""Mistral: Llama whose attention sees only the last `sliding_window` positions.

The KV cache keeps every position (its length is set per request), and the mask hides the ones
that have slid out of the window, so a sequence longer than the window decodes correctly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import ModelConfig
from ..decoder import CausalLM, Decoder
from ..kv_cache import KVCache, causal_mask


@dataclass(frozen=True)
class MistralConfig(ModelConfig):
    sliding_window: int | None = None

    @classmethod
    def fields_from(cls, raw: dict[str, Any]) -> dict[str, Any]:
        window = raw.get("sliding_window")
        return {**super().fields_from(raw), "sliding_window": int(window) if window else None}


class MistralDecoder(Decoder):
    def __init__(self, config: MistralConfig) -> None:
        super().__init__(config)
        self.sliding_window = config.sliding_window

    def attention_mask(self, input_pos: torch.Tensor, cache: KVCache | None) -> torch.Tensor | None:
        if self.sliding_window is None:
            return super().attention_mask(input_pos, cache)
        keys = cache.positions if cache is not None else input_pos
        return causal_mask(input_pos, keys, self.sliding_window)  # (B, 1, T, L)


class MistralForCausalLM(CausalLM):
    decoder_class = MistralDecoder


MODEL_TYPE = "mistral"  # config.json's model_type
CONFIG = MistralConfig
MODEL = MistralForCausalLM
