"""Gemma 3 (the text model): Llama with these changes.

- RMSNorm scales by (1 + weight), in float32, and normalises q and k per head too;
- each block norms before *and* after both attention and the MLP;
- embeddings are multiplied by sqrt(hidden size);
- layers alternate between sliding-window attention (local rotary base) and global attention
  (global rotary base), as `layer_types` says;
- attention scores are scaled by `query_pre_attn_scalar ** -0.5` rather than `head_dim ** -0.5`;
- the MLP's gate uses tanh-approximated GELU;
- logits may be soft-capped: cap * tanh(logits / cap).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ...errors import CheckpointError
from ..decoder import (
    MLP,
    Attention,
    CausalLM,
    Decoder,
    DecoderLayer,
    Parts,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    attend,
)
from ..kv_cache import KVCache, causal_mask

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class Gemma3Config(ModelConfig):
    sliding_window: int = 4096
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float = 10000.0
    query_pre_attn_scalar: float = 256.0
    final_logit_softcapping: float | None = None

    @classmethod
    def fields_from(cls, raw: dict[str, Any]) -> dict[str, Any]:
        if raw.get("attn_logit_softcapping") is not None:
            raise CheckpointError("Gemma 3 with attn_logit_softcapping is not supported")
        base = super().fields_from({**raw, "rope_parameters": None, "rope_scaling": None})
        layers = base["num_hidden_layers"]
        pattern = int(raw.get("sliding_window_pattern", 6))
        default_types = [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
        global_theta, local_theta = _rope_thetas(raw)
        return {
            **base,
            "rope_theta": global_theta,
            "rope_local_theta": local_theta,
            "sliding_window": int(raw.get("sliding_window") or 4096),
            "layer_types": tuple(raw.get("layer_types") or default_types),
            "query_pre_attn_scalar": float(raw.get("query_pre_attn_scalar", 256)),
            "final_logit_softcapping": raw.get("final_logit_softcapping"),
            "tie_word_embeddings": bool(raw.get("tie_word_embeddings", True)),
        }


def _rope_thetas(raw: dict[str, Any]) -> tuple[float, float]:
    """(global, local) rotary bases, from `rope_parameters` per layer type or the older fields."""
    params = raw.get("rope_parameters") or {}
    full, sliding = params.get(FULL) or {}, params.get(SLIDING) or {}
    for kind in (full, sliding, raw.get("rope_scaling") or {}):
        if kind.get("rope_type", "default") != "default":
            raise CheckpointError(f"Gemma 3 rope_type {kind['rope_type']!r} is not supported (supported: default)")
    global_theta = full.get("rope_theta", raw.get("rope_theta", 1_000_000.0))
    local_theta = sliding.get("rope_theta", raw.get("rope_local_base_freq", 10_000.0))
    return float(global_theta), float(local_theta)


class Gemma3RMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)  # scale in float32, then cast


class Gemma3Attention(Attention):
    def __init__(self, config: Gemma3Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.q_norm = Gemma3RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = Gemma3RMSNorm(config.head_dim, config.rms_norm_eps)
        self.scale = config.query_pre_attn_scalar**-0.5

    def forward(self, x, cos, sin, input_pos, cache, mask) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rotary(self.q_norm(q), cos, sin), apply_rotary(self.k_norm(k), cos, sin)
        y = self.heads(attend(q, k, v, self.layer_idx, input_pos, cache, mask, self.scale, self.probs))  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))  # (B, T, C)


class Gemma3MLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Gemma3DecoderLayer(DecoderLayer):
    attention_class = Gemma3Attention

    def __init__(self, config: Gemma3Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        size, eps = config.hidden_size, config.rms_norm_eps
        self.mlp = Gemma3MLP(config)
        self.input_layernorm = Gemma3RMSNorm(size, eps)
        self.post_attention_layernorm = Gemma3RMSNorm(size, eps)
        self.pre_feedforward_layernorm = Gemma3RMSNorm(size, eps)
        self.post_feedforward_layernorm = Gemma3RMSNorm(size, eps)

    def forward(self, x, cos, sin, input_pos, cache, mask) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, input_pos, cache, mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Decoder(Decoder):
    layer_class = Gemma3DecoderLayer

    def __init__(self, config: Gemma3Config) -> None:
        super().__init__(config)
        self.norm = Gemma3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_local = RotaryEmbedding(replace(config, rope_theta=config.rope_local_theta, rope_scaling=None))
        self.embed_scale = config.hidden_size**0.5
        self.layer_types = config.layer_types
        self.sliding_window = config.sliding_window

    def forward(
        self, input_ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache | None, dtype: torch.dtype
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids).to(dtype)  # (B, T, C)
        x = x * torch.tensor(self.embed_scale, dtype=dtype)  # the scale rounded to x's dtype, as the reference
        keys = cache.positions if cache is not None else input_pos
        rope = {FULL: self.rotary_emb(input_pos, dtype), SLIDING: self.rotary_local(input_pos, dtype)}
        masks = {FULL: self.attention_mask(input_pos, cache), SLIDING: causal_mask(input_pos, keys, self.sliding_window)}
        for layer, kind in zip(self.layers, self.layer_types):
            cos, sin = rope[kind]  # (B, 1, T, hd) each
            x = layer(x, cos, sin, input_pos, cache, masks[kind])
        return self.norm(x)  # (B, T, C)


class Gemma3ForCausalLM(CausalLM):
    decoder_class = Gemma3Decoder
    # The layer's sublayers reach the residual stream through their own post-norms.
    parts = Parts("model.layers", "self_attn", "mlp", "post_attention_layernorm", "post_feedforward_layernorm", "model.norm")

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)  # (..., V)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


MODEL_TYPE = "gemma3_text"  # config.json's model_type
CONFIG = Gemma3Config
MODEL = Gemma3ForCausalLM
