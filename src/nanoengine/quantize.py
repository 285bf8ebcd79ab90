"""Weight-only quantization in groups of 32 input values: llama.cpp's block formats.

Every group of 32 weights is stored as codes, a float16 scale and a float16 offset:
w = scale * q + offset.
- 4-bit (`dtype="int4"`, the layers' projections; Q4_1): q in [0, 15], packed two per byte as
  in the GGUF block (byte j holds value j in its low nibble and value j + 16 in its high one);
  offset = the group's minimum, scale = (max - min) / 15.
- 8-bit (`dtype="int8"`, and the embeddings and head of `int4`): q in [0, 255], one byte each.
  Each group takes the first of these that reproduces it exactly, else the last: the 4-bit grid
  above (weights that came from Q4_1 blocks), llama.cpp's Q8_0 grid (scale = max |w| / 127,
  q - 128 in [-127, 127], offset = -128 * scale), or 255 steps from the minimum to the maximum.

Scales and offsets are rounded to float16, as in the GGUF. Where the weights were dequantized
from such blocks, as the registered SmolLM2's are (its layers Q4_1, its embedding Q8_0), this
recovers the blocks exactly and dequantizing reproduces the float32 weights bit for bit (q *
scale is exact in float32; adding the offset rounds once, as the GGUF reference does). Other
checkpoints get the ordinary round-to-nearest error of their format.

Activations stay float. A projection dequantizes its weight and multiplies: eagerly that makes a
float32 copy of one matrix at a time; inside `torch.compile` the one-token product and the
dequantization fuse into a single pass over the codes (see `model.project`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .families.gpt2 import Conv1D
from .model import CausalLM, Linear, project

GROUP_SIZE = 32


def group_size(in_features: int, bits: int) -> int:
    """32 where the row divides into 32s; otherwise the whole row is one group (0: no 4-bit layout fits)."""
    if in_features % GROUP_SIZE == 0:
        return GROUP_SIZE
    return in_features if bits == 8 or in_features % 2 == 0 else 0


def quantize(weight: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Group-wise codes, float16 scales and offsets of a float weight (out, in) (module docstring)."""
    out_features, in_features = weight.shape
    size = group_size(in_features, bits)
    groups = weight.float().reshape(out_features, in_features // size, size)  # (out, G, size)
    low, high = groups.amin(-1), groups.amax(-1)  # (out, G)
    codes, scale, offset = _on_grid(groups, low.half(), ((high - low) / 15).half(), 15)
    if bits == 4:
        half = size // 2
        return {"codes": codes[..., :half] | (codes[..., half:] << 4), "scale": scale, "offset": offset}
    q8_scale = (torch.maximum(high, -low) / 127).half()
    q8 = _on_grid(groups, (q8_scale.float() * -128).half(), q8_scale, 255)
    wide = _on_grid(groups, low.half(), ((high - low) / 255).half(), 255)
    codes, scale, offset = _first_exact(groups, [(codes, scale, offset), q8, wide])
    return {"codes": codes, "scale": scale, "offset": offset}


def _first_exact(groups: torch.Tensor, candidates: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Per group, the first candidate (codes, scale, offset) that reproduces it exactly, else the last."""
    codes, scale, offset = candidates[-1]
    for c, s, o in reversed(candidates[:-1]):
        exact = _exact(groups, c, s, o)  # (out, G)
        codes = torch.where(exact[..., None], c, codes)
        scale, offset = torch.where(exact, s, scale), torch.where(exact, o, offset)
    return codes, scale, offset


def _on_grid(
    groups: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (uint8, in [0, top]) of `groups` on the grid offset + scale * q; and scale, offset."""
    inverse = torch.where(scale > 0, 1 / scale.float(), torch.zeros_like(scale, dtype=torch.float32))
    q = ((groups - offset.float()[..., None]) * inverse[..., None]).round_().clamp_(0, top)
    return q.to(torch.uint8), scale, offset


def _exact(groups: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Which groups (out, G) the codes reproduce bit for bit."""
    return (dequantize(codes, scale, offset, packed=False).view_as(groups) == groups).all(-1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, packed: bool) -> torch.Tensor:
    """The float32 weights (rows..., in) of codes (rows..., G, size, or size / 2 when `packed`)."""
    if packed:  # low nibbles are values 0-15 of a group, high ones 16-31; written so that inductor fuses it
        shifts = torch.tensor([[0], [4]], dtype=torch.uint8, device=codes.device)  # (2, 1)
        values = ((codes.unsqueeze(-2) >> shifts) & 15).flatten(-2)  # (rows..., G, 2, size/2) -> (rows..., G, size)
    else:
        values = codes  # (rows..., G, size)
    weights = values.float() * scale.float()[..., None] + offset.float()[..., None]
    return weights.flatten(-2)


class QuantizedTensor(nn.Module):
    """A (rows, in) weight held as group-wise codes, scales and offsets (buffers)."""

    def __init__(self, rows: int, in_features: int, bits: int) -> None:
        super().__init__()
        self.bits = bits
        size = group_size(in_features, bits)
        groups = in_features // size
        self.register_buffer("codes", torch.empty(rows, groups, size * bits // 8, dtype=torch.uint8))
        self.register_buffer("scale", torch.empty(rows, groups, dtype=torch.float16))
        self.register_buffer("offset", torch.empty(rows, groups, dtype=torch.float16))

    @property
    def weight(self) -> torch.Tensor:
        """The packed codes: what callers asking a layer's device or memory see."""
        return self.codes

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (rows, in). Under `torch.compile` it fuses into its consumer."""
        return dequantize(self.codes, self.scale, self.offset, packed=self.bits == 4)

    def share(self, other: QuantizedTensor) -> None:
        """Use `other`'s codes and scales (a head tied to its embedding)."""
        self.codes, self.scale, self.offset = other.codes, other.scale, other.offset


class QuantizedLinear(QuantizedTensor):
    """y = x @ W.T + b with W quantized; the product and its bias in x's dtype."""

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool) -> None:
        super().__init__(out_features, in_features, bits)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = project(x, self.dequantized())  # (..., T, out)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class QuantizedEmbedding(QuantizedTensor):
    """An embedding table whose rows are dequantized as they are looked up."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 8) -> None:
        super().__init__(num_embeddings, embedding_dim, bits)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize(self.codes[ids], self.scale[ids], self.offset[ids], packed=self.bits == 4)  # (..., C)


@dataclass(frozen=True)
class QuantizedWeight:
    """Where a checkpoint weight goes: the module (by name) that quantizes it, and whether the
    checkpoint stores it transposed ((in, out), GPT-2's Conv1D)."""

    module: str
    bits: int
    transposed: bool = False

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The module's state entries for the checkpoint's float `weight`."""
        tensors = quantize(weight.t() if self.transposed else weight, self.bits)
        return {f"{self.module}.{key}": value for key, value in tensors.items()}


@dataclass
class QuantizationPlan:
    """What `use_quantized_modules` swapped in: checkpoint weight name -> where it goes, and the
    heads tied to an embedding (head module name -> embedding module name)."""

    weights: dict[str, QuantizedWeight]
    tied: dict[str, str]

    def tie(self, model: nn.Module) -> None:
        """Point each tied head at its embedding's tensors (after loading, which replaces them)."""
        for head, embedding in self.tied.items():
            model.get_submodule(head).share(model.get_submodule(embedding))


def use_quantized_modules(model: CausalLM, bits: int) -> QuantizationPlan:
    """Swap, on the meta model before loading, every projection and embedding for a quantized one.

    bits=8: all of them int8. bits=4: the layers' projections 4-bit; embeddings and an untied head
    8-bit, as llama.cpp's Q4_1 files keep them. A head tied to an embedding becomes a
    `QuantizedLinear` sharing that embedding's codes and scales, in every family.
    """
    embedding_of = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    weights: dict[str, QuantizedWeight] = {}
    tied: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        new, transposed = _quantized(module, bits if name != "lm_head" else 8)
        if new is None:
            continue
        if isinstance(module, Linear) and id(module.weight) in embedding_of:
            tied[name] = embedding_of[id(module.weight)]
            new = QuantizedLinear(module.in_features, module.out_features, 8, bias=module.bias is not None)
        else:
            weights[f"{name}.weight"] = QuantizedWeight(name, new.bits, transposed)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return QuantizationPlan(weights, tied)


def _quantized(module: nn.Module, bits: int) -> tuple[QuantizedTensor | None, bool]:
    """The quantized stand-in for `module` (None if it has none) and whether its weight is (in, out)."""
    if isinstance(module, nn.Embedding):
        return QuantizedEmbedding(module.num_embeddings, module.embedding_dim), False
    if isinstance(module, Linear):
        in_features, out_features, transposed = module.in_features, module.out_features, False
    elif isinstance(module, Conv1D):
        (in_features, out_features), transposed = module.weight.shape, True
    else:
        return None, False
    if not group_size(in_features, bits):
        bits = 8
    return QuantizedLinear(in_features, out_features, bits, bias=module.bias is not None), transposed
