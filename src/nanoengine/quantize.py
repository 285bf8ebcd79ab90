"""Weight-only int8: each output channel (row) of a weight stored as int8 times one float scale.

Quantization happens at load time, tensor by tensor, from the checkpoint's float weights. The
activations stay float: a projection upcasts its int8 weight and multiplies by the row scales
after the product (the same thing as dequantizing first, since a row's scale factors out of its
dot product). The embedding table is quantized by row too, so that a head tied to it shares it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import CausalLM, Linear, project


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (int8 weight (out, in), float32 scale (out,))."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
    return q, scale


class Int8Linear(Linear):
    """A `Linear` whose weight is int8 with a float scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.register_buffer("scale", torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = project(x, self.weight) * self.scale.to(x.dtype)  # (..., T, out)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Int8Embedding(nn.Embedding):
    """An embedding table stored as int8 rows with a float scale each."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        table = torch.empty(num_embeddings, embedding_dim, dtype=torch.int8)
        super().__init__(num_embeddings, embedding_dim, _weight=table, _freeze=True)
        self.register_buffer("scale", torch.ones(num_embeddings))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float() * self.scale[ids, None]  # (B, T, C)


def use_int8_modules(model: CausalLM) -> set[str]:
    """Swap every `Linear` and the embedding for their int8 versions (on the meta device, before
    loading); return the names of the weights that must be quantized as they are loaded."""
    names = set()
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                new = Int8Linear(child.in_features, child.out_features, bias=child.bias is not None)
            elif isinstance(child, nn.Embedding):
                new = Int8Embedding(child.num_embeddings, child.embedding_dim)
            else:
                continue
            setattr(parent, child_name, new)
            names.add(f"{parent_name}.{child_name}.weight".lstrip("."))
    model.tie_weights()
    return names
