"""A Llama-family decoder, written out by hand.

Module attribute names follow the Hugging Face checkpoint keys (`model.layers.0.self_attn.q_proj`,
`model.norm`, `lm_head`, ...), so a checkpoint's state dict loads as it is, with no renaming table.

Shapes in comments: B batch, T new tokens, L cache length, C hidden size, nh query heads,
nkv key/value heads, hd head size, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, RopeScaling


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions.

    Shapes never change during a generation: a decode step writes one position at `input_pos`
    and attends over the whole buffer with a mask, which is what lets a step be compiled or
    captured as a graph.
    """

    def __init__(
        self, config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (layers, B, nkv, L, hd)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.arange(max_len, device=device)  # (L,)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(
        self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys and values at `input_pos`; return the layer's whole buffers."""
        k_all, v_all = self.k[layer], self.v[layer]  # (B, nkv, L, hd)
        k_all.index_copy_(2, input_pos, k)
        v_all.index_copy_(2, input_pos, v)
        return k_all, v_all

    def causal_mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        """True where a query at `input_pos` may attend: every cache position up to its own."""
        return self.positions[None, :] <= input_pos[:, None]  # (T, L)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the weights' dtype, as the reference does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """One frequency per pair of channels, optionally rescaled the Llama 3 way."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # (hd/2,)
    if scaling is None:
        return inv_freq
    # Llama 3: leave high frequencies alone, divide low ones by `factor`, blend in between.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    in_between = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(in_between, blended, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, computed once and indexed by position."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        if not self.cos.is_meta:
            self.build_tables()

    def build_tables(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the tables; a model built on the meta device calls this once it has weights."""
        c = self.config
        inv_freq = rope_inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
        positions = torch.arange(c.max_position_embeddings, dtype=torch.float)
        freqs = positions[:, None] * inv_freq[None, :]  # (P, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, hd): the half-rotation layout
        device = device if device is not None else self.cos.device
        self.cos = emb.cos().to(device)
        self.sin = emb.sin().to(device)

    def forward(self, input_pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[input_pos].to(dtype), self.sin[input_pos].to(dtype)  # (T, hd) each


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin  # (B, heads, T, hd)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.num_attention_heads
        self.n_kv_head = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: torch.Tensor,
        cache: KVCache | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            # No cache: the T tokens are the whole sequence, from position 0.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, nh, T, hd)
        else:
            k, v = cache.update(self.layer_idx, input_pos, k, v)  # (B, nkv, L, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)  # (B, T, C)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, input_pos, cache, mask) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The stack under the head: embeddings, layers, final norm (checkpoint prefix `model.`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self.rotary_emb(input_pos, x.dtype)  # (T, hd) each
        mask = cache.causal_mask(input_pos) if cache is not None else None  # (T, L)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, cache, mask)
        return self.norm(x)  # (B, T, C)


class CausalLM(nn.Module):
    """Decoder plus output head: token ids in, next-token logits out."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for `input_ids` (B, T) placed at `input_pos` (T,).

        Without a cache the tokens are the whole sequence from position 0. With one, their keys
        and values are written into it and attention sees everything cached up to each position.
        """
        if input_pos is None:
            input_pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        x = self.model(input_ids, input_pos, cache)  # (B, T, C)
        if last_only:
            # Generation only needs the next token: skip the head on every other position.
            x = x[:, -1:, :]  # (B, 1, C)
        return self.lm_head(x)  # (B, T, V)
