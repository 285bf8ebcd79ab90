"""A Llama-family decoder, written out by hand.

Module attribute names follow the Hugging Face checkpoint keys (`model.layers.0.self_attn.q_proj`,
`model.norm`, `lm_head`, ...), so a checkpoint's state dict loads as it is, with no renaming table.

Shapes in comments: B batch, T new tokens, L cache length, C hidden size, nh query heads,
nkv key/value heads, hd head size, V vocabulary.

Weights may be stored in a smaller dtype than the activations (bfloat16, float16, or int8 with
scales, see `quantize.py`): each projection upcasts its weight as it uses it. On CPU the activations
stay float32 whatever the weights' dtype, because half-precision arithmetic is slow there; what the
smaller weights buy is memory traffic, which is what a one-token decode step is bound by.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, RopeScaling
from .kv_cache import KVCache, causal_mask


class HookPoint(nn.Identity):
    """A named place in the forward pass where a trace reads, or an intervention replaces, a tensor.

    It passes its input through unchanged; a forward hook registered on it (see `tracing.py`)
    sees the tensor and may return a replacement. With no hook it costs one call.
    """

    @property
    def active(self) -> bool:
        return bool(self._forward_hooks)


class Linear(nn.Linear):
    """`nn.Linear` whose weight may be stored in a smaller dtype than its input."""

    transposed_weight = False  # a projection quantization may swap (`quantize.py`): its weight is (out, in)
    # x @ W.T, the reference's own (MKL on CPU): the model's forward computes transformers'
    # numbers bit for bit. The engine's runner swaps in a faster one (`engine/compiling.py`).
    product = staticmethod(F.linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x, self.weight.to(x.dtype))  # (..., T, out); upcasts one matrix at a time
        return y if self.bias is None else y + self.bias.to(y.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the weights' dtype, as the reference does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * x32.to(x.dtype)


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
        """Tables for each row's positions (B, T), shaped to broadcast over heads: (B, 1, T, hd)."""
        return self.cos[input_pos].unsqueeze(1).to(dtype), self.sin[input_pos].unsqueeze(1).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin  # (B, heads, T, hd)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_idx: int,
    input_pos: torch.Tensor,
    cache: KVCache | None,
    mask: torch.Tensor | None,
    scale: float | None = None,
    probs: HookPoint | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention of q (B, nh, T, hd) over the new k/v, or over the cache.

    Without a cache the T tokens are the whole sequence from position 0, and a None mask means
    plainly causal. With one, the new keys and values are written into it first. When a trace
    watches `probs`, the attention probabilities are computed explicitly and shown to it;
    otherwise SDPA computes the same result without ever forming them.
    """
    if cache is not None:
        k, v = cache.update(layer_idx, input_pos, k, v)  # (B, nkv, L, hd)
    if probs is not None and probs.active:
        return explicit_attention(q, k, v, mask, scale, probs)
    B, nh, T, hd = q.shape
    if T == 1 and mask is not None and nh > k.shape[1]:
        # One new token per row (a decode step): the query heads that share a key/value head
        # attend as that head's queries, so each cached key is read once rather than once per
        # query head (a third less time at 32 rows x 512 positions, where reading the cache
        # costs as much as the layer's matrix products); the mask (B, 1, 1, L) holds for all.
        grouped = q.reshape(B, k.shape[1], nh // k.shape[1], hd)  # (B, nkv, nh/nkv, hd)
        out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scale)  # (B, nkv, nh/nkv, hd)
        return out.reshape(B, nh, 1, hd)  # a view on CPU; CUDA's kernels may return it strided
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
    )  # (B, nh, T, hd)


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None, probs: HookPoint
) -> torch.Tensor:
    """Attention written out, as transformers' eager path does, with the probabilities shown to `probs`."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, nh, L, hd)
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)  # (B, nh, T, L)
    if mask is None:
        T, L = q.shape[-2], k.shape[-2]
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(L - T)  # (T, L)
    scores = scores.masked_fill(~mask, -math.inf)
    weights = probs(torch.softmax(scores.float(), dim=-1).to(q.dtype))  # (B, nh, T, L)
    return weights @ v  # (B, nh, T, hd)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.num_attention_heads
        self.n_kv_head = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_head * self.head_dim, config.hidden_size, bias=bias)
        self.probs = HookPoint()  # (B, nh, T, L) attention probabilities, when traced
        self.heads = HookPoint()  # (B, nh, T, hd) each head's output, before o_proj

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
        y = self.heads(attend(q, k, v, self.layer_idx, input_pos, cache, mask, probs=self.probs))  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)  # (B, T, C)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    attention_class = Attention  # a family swaps in its own

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self.attention_class(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, input_pos, cache, mask) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The stack under the head: embeddings, layers, final norm (checkpoint prefix `model.`)."""

    layer_class = DecoderLayer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(
        self, input_ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache | None, dtype: torch.dtype
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids).to(dtype)  # (B, T, C)
        cos, sin = self.rotary_emb(input_pos, x.dtype)  # (B, 1, T, hd) each
        mask = self.attention_mask(input_pos, cache)  # (B, 1, T, L) or None
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, cache, mask)
        return self.norm(x)  # (B, T, C)

    def attention_mask(self, input_pos: torch.Tensor, cache: KVCache | None) -> torch.Tensor | None:
        """Where each query may attend; None for plainly causal attention without a cache."""
        return cache.causal_mask(input_pos) if cache is not None else None  # (B, 1, T, L)


@dataclass(frozen=True)
class Parts:
    """Where a family keeps the parts that research tools hook, as module paths: the layers, and
    inside a layer its attention and MLP and the modules whose outputs are added to the residual
    stream; the final norm."""

    layers: str
    attention: str
    mlp: str
    attention_added: str
    mlp_added: str
    final_norm: str


class CausalLM(nn.Module):
    """Decoder plus output head: token ids in, next-token logits out."""

    decoder_class = Decoder
    parts = Parts("model.layers", "self_attn", "mlp", "self_attn", "mlp", "model.norm")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = self.decoder_class(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # quantized heads: see QuantizationPlan.load

    @property
    def compute_dtype(self) -> torch.dtype:
        """The activations' (and KV cache's) dtype: float32 on CPU, else the weights' float dtype."""
        dtype = self.model.norm.weight.dtype
        return torch.float32 if self.model.norm.weight.device.type == "cpu" else dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for `input_ids` (B, T) placed at `input_pos`: (B, T), each row its own positions,
        or (T,) shared by every row.

        Without a cache the tokens are the whole sequence from position 0. With one, row b's keys
        and values are written into the cache's row b, and attention sees everything cached there
        up to each position.
        """
        B, T = input_ids.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=input_ids.device)  # (T,)
        if input_pos.dim() == 1:
            input_pos = input_pos.expand(B, T)  # (B, T)
        x = self.hidden_states(input_ids, input_pos, cache)  # (B, T, C)
        if last_only:
            # Generation only needs the next token: skip the head on every other position.
            x = x[:, -1:, :]  # (B, 1, C)
        return self.logits_of(x)  # (B, T, V)

    def hidden_states(self, input_ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """The final-normed hidden states (B, T, C) under the head, for positions (B, T)."""
        return self.model(input_ids, input_pos, cache, self.compute_dtype)

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head on final-normed hidden states (..., C) -> logits (..., V)."""
        return self.lm_head(hidden)
