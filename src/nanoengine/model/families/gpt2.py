"""GPT-2: the older decoder, differing from Llama almost everywhere.

- LayerNorm with bias instead of RMSNorm;
- learned absolute position embeddings (`wpe`) added to the token embeddings, no rotary;
- one fused `c_attn` projection for q, k and v, and a GELU (tanh) MLP without a gate;
- weights stored in the checkpoint as Conv1D, that is transposed: (in, out), used as x @ W + b;
- the checkpoint's prefix is `transformer.`, and the head is always tied to `wte`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ...errors import CheckpointError
from ..decoder import CausalLM, HookPoint, Linear, Parts, attend
from ..kv_cache import KVCache

ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # name -> F.gelu approximate


@dataclass(frozen=True)
class GPT2Config(ModelConfig):
    layer_norm_epsilon: float = 1e-5
    gelu_approximate: str = "tanh"

    @classmethod
    def fields_from(cls, raw: dict[str, Any]) -> dict[str, Any]:
        for unsupported in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if raw.get(unsupported):
                raise CheckpointError(f"GPT-2 with {unsupported} is not supported")
        activation = raw.get("activation_function", "gelu_new")
        if activation not in ACTIVATIONS:
            raise CheckpointError(f"GPT-2 activation {activation!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        hidden, heads = int(raw["n_embd"]), int(raw["n_head"])
        return dict(
            model_type="gpt2",
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw.get("n_inner") or 4 * hidden),
            num_hidden_layers=int(raw["n_layer"]),
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=hidden // heads,
            max_position_embeddings=int(raw["n_positions"]),
            layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)),
            gelu_approximate=ACTIVATIONS[activation],
            tie_word_embeddings=True,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=(int(raw["eos_token_id"]),) if raw.get("eos_token_id") is not None else (),
        )


class Conv1D(nn.Module):
    """A linear layer stored the GPT-2 way: weight (in, out), y = x @ W + b."""

    transposed_weight = True  # a projection quantization may swap, its weight (in, out): see `Linear`

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.addmm(self.bias.to(x.dtype), x.reshape(-1, x.shape[-1]), self.weight.to(x.dtype))  # (B*T, out)
        return y.view(*x.shape[:-1], -1)  # (B, T, out)


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` whose weights may be stored in a smaller dtype than its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx, self.n_head, self.head_dim = layer_idx, config.num_attention_heads, config.head_dim
        self.c_attn = Conv1D(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = Conv1D(config.hidden_size, config.hidden_size)
        self.probs = HookPoint()  # (B, nh, T, L) attention probabilities, when traced
        self.heads = HookPoint()  # (B, nh, T, hd) each head's output, before c_proj

    def forward(self, x, input_pos, cache, mask) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            part.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
            for part in self.c_attn(x).split(C, dim=-1)
        )
        y = self.heads(attend(q, k, v, self.layer_idx, input_pos, cache, mask, probs=self.probs))  # (B, nh, T, hd)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = Conv1D(config.hidden_size, config.intermediate_size)
        self.c_proj = Conv1D(config.intermediate_size, config.hidden_size)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x, input_pos, cache, mask) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), input_pos, cache, mask)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    """Embeddings, blocks, final norm (checkpoint prefix `transformer.`)."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, input_ids, input_pos, cache: KVCache | None, dtype: torch.dtype) -> torch.Tensor:
        x = (self.wte(input_ids) + self.wpe(input_pos)).to(dtype)  # (B, T, C); positions per row
        mask = cache.causal_mask(input_pos) if cache is not None else None  # (B, 1, T, L)
        for block in self.h:
            x = block(x, input_pos, cache, mask)
        return self.ln_f(x)  # (B, T, C)


class GPT2LMHeadModel(CausalLM):
    parts = Parts("transformer.h", "attn", "mlp", "attn", "mlp", "transformer.ln_f")
    """GPT-2 behind the same interface as every other family (see `CausalLM.forward`)."""

    def __init__(self, config: GPT2Config) -> None:
        nn.Module.__init__(self)  # not CausalLM's: the parts and their names differ
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        self.lm_head.weight = self.transformer.wte.weight

    @property
    def compute_dtype(self) -> torch.dtype:
        weight = self.transformer.ln_f.weight
        return torch.float32 if weight.device.type == "cpu" else weight.dtype

    def hidden_states(self, input_ids, input_pos, cache) -> torch.Tensor:
        return self.transformer(input_ids, input_pos, cache, self.compute_dtype)  # (B, T, C)


MODEL_TYPE = "gpt2"  # config.json's model_type
CONFIG = GPT2Config
MODEL = GPT2LMHeadModel
