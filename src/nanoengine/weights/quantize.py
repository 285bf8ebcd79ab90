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

Activations stay float. A projection has one product, `forward`: it dequantizes its weight, from
a row-major copy of the codes, into a buffer reused by every projection of the thread (one
float32 matrix at a time, written in place: no fresh allocation to page in at every step) and
multiplies. `matvec` is the same product for a
few rows that reads the codes once and never builds the float32 matrix, for `torch.compile`
(3x faster than float32's own one-token product on CPU); which one a step uses is the runner's
choice (`engine/compiling.py`).

That is the blocks' file layout (`quantize`, the GGUF, `model.blocks.safetensors`). Loaded, a
module lays them out for that kernel (`QuantizedTensor.load_blocks`): see `QuantizedTensor`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model.decoder import CausalLM

GROUP_SIZE = 32


def group_size(in_features: int, bits: int) -> int:
    """32 where the row divides into 32s; otherwise the whole row is one group, if its codes fill
    32-bit words (the kernel reads words); else 0: no layout fits `bits`."""
    if in_features % GROUP_SIZE == 0:
        return GROUP_SIZE
    return in_features if in_features % (32 // bits) == 0 else 0


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
    """The float32 weights (rows..., in) of blocks in the file layout: codes (rows..., G, size, or
    size / 2 when `packed`), scales and offsets (rows..., G)."""
    if packed:  # low nibbles are values 0-15 of a group, high ones 16-31
        shifts = torch.tensor([[0], [4]], dtype=torch.uint8, device=codes.device)  # (2, 1)
        values = ((codes.unsqueeze(-2) >> shifts) & 15).flatten(-2)  # (rows..., G, 2, size/2) -> (rows..., G, size)
    else:
        values = codes  # (rows..., G, size)
    weights = values.float() * scale.float()[..., None] + offset.float()[..., None]
    return weights.flatten(-2)


ROW_BLOCK = 8  # output rows side by side in the kernel layout: one AVX2 vector of float32


class QuantizedTensor(nn.Module):
    """A (rows, in) weight held as group-wise codes, scales and offsets, laid out for `matvec`.

    Kernel layout, for B = `ROW_BLOCK` rows side by side (fewer where rows do not divide by 8):
    - `codes` (rows / B, G, W, B): the group's code bytes as W 32-bit words, row by row in blocks
      of B, so that one vector load reads the same word of B rows. Word m holds bytes 4m..4m+3
      (little-endian), byte j the values j (and, 4-bit, j + size / 2 in its high nibble). The
      words are stored as float32 bit patterns and reinterpreted as int32 where they are used:
      inductor's CPU code loads float vectors directly but copies integer ones through the stack.
    - `scale`, `offset` (rows / B, G, 1, B) in float32 (exactly the blocks' float16 values):
      float16 here makes inductor work on 16 lanes, with slow conversions.
    """

    def __init__(self, rows: int, in_features: int, bits: int) -> None:
        super().__init__()
        self.bits, self.rows, self.in_features = bits, rows, in_features
        size = group_size(in_features, bits)
        block = next(b for b in (ROW_BLOCK, 4, 2, 1) if rows % b == 0)
        groups, words = in_features // size, size * bits // 32
        self.register_buffer("codes", torch.empty(rows // block, groups, words, block, dtype=torch.float32))
        self.register_buffer("scale", torch.empty(rows // block, groups, 1, block))
        self.register_buffer("offset", torch.empty(rows // block, groups, 1, block))

    @property
    def weight(self) -> torch.Tensor:
        """The codes: what callers asking a layer's device or memory see."""
        return self.codes

    def load_blocks(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> None:
        """Take blocks in the file layout (`quantize`'s) and keep them in the kernel layout."""
        blocks, groups, words, block = self.codes.shape
        by_row = codes.contiguous().view(torch.int32).view(blocks, block, groups, words)  # bytes -> words
        self.codes = by_row.permute(0, 2, 3, 1).contiguous().view(torch.float32)  # (rows/B, G, W, B)
        self.scale, self.offset = (t.float().view(blocks, block, groups, 1).permute(0, 2, 3, 1).contiguous() for t in (scale, offset))
        self.__dict__.pop("_rows_cache", None)

    def dequantized(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weight (rows, in), written once, in order (into `out`'s memory when given, at
        least rows * in floats). This is the prompt's pass (and every uncompiled step).

        It reads the row-major copy of the codes (`_by_row`): converting contiguous bytes and then
        scaling in place are vectorised passes, where decoding the kernel layout's interleaved
        rows into place was not (1536 x 576, 8-bit, 2 CPUs: 0.34 ms against 2.4 ms).
        """
        codes, scale, offset = self._by_row()  # (rows, G, size) uint8, (rows, G, 1), (rows, G, 1)
        if out is None:
            weight = torch.empty(codes.shape, device=codes.device)
        else:
            weight = out.view(-1)[: codes.numel()].view(codes.shape)
        # q * scale is exact in float32, so adding the offset rounds once, as in `dequantize`
        return weight.copy_(codes).mul_(scale).add_(offset).view(self.rows, self.in_features)

    def _by_row(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The blocks row by row, one byte per code (codes (rows, G, size) uint8; 4-bit ones unpacked
        from their nibbles), scales and offsets (rows, G, 1) float32: made from the kernel layout
        the first time they are needed and held while the module lives, a byte per weight (a model
        that only ever runs compiled one-row steps never makes them)."""
        cached = self.__dict__.get("_rows_cache")
        if cached is None or cached[0].device != self.codes.device:
            blocks, groups, words, block = self.codes.shape
            by_row = self.codes.view(torch.int32).permute(0, 3, 1, 2).contiguous()  # (rows/B, B, G, W)
            codes = by_row.view(torch.uint8).view(self.rows, groups, words * 4)  # (rows, G, bytes)
            if self.bits == 4:  # low nibbles are values 0 to size/2 - 1 of a group, high ones the rest
                codes = torch.cat([codes & 15, codes >> 4], dim=-1)  # (rows, G, size)
            scale, offset = (t.permute(0, 3, 1, 2).reshape(self.rows, groups, 1) for t in (self.scale, self.offset))
            cached = self.__dict__["_rows_cache"] = (codes, scale, offset)
        return cached

    def dequantized_in_graph(self) -> torch.Tensor:
        """The same float32 weight (rows, in) without writing into a given memory, for a compiled
        step of several rows (inductor fuses the decoding into one pass over the codes)."""
        blocks, groups, words, block = self.codes.shape
        halves = 2 if self.bits == 4 else 1
        weights = self._codes(self.codes) * self.scale.unsqueeze(2) + self.offset.unsqueeze(2)  # (rows/B, G, L, W, B)
        # lane h*4 + b of word m holds k = g*size + h*size/2 + 4m + b
        by_row = weights.view(blocks, groups, halves, 4, words, block).permute(0, 5, 1, 2, 4, 3)  # (rows/B, B, G, h, W, b)
        return by_row.reshape(self.rows, self.in_features)

    def rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The float32 rows (..., in) of the weight at `ids` (...): an embedding lookup."""
        block = self.codes.shape[-1]
        words, scale, offset = (t[ids // block, :, :, ids % block] for t in (self.codes, self.scale, self.offset))
        weights = self._codes(words.unsqueeze(-1)).squeeze(-1) * scale.unsqueeze(-1) + offset.unsqueeze(-1)  # (..., G, L, W)
        *lead, groups, lanes, words_ = weights.shape
        return weights.view(*lead, groups, lanes // 4, 4, words_).transpose(-1, -2).reshape(*lead, self.in_features)

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T for a few rows x (R, in), reading the codes once, for `torch.compile` (eagerly it
        makes a float32 copy of the weight, as `dequantized` does)."""
        blocks, groups, words, block = self.codes.shape
        lanes = 32 // self.bits
        xs = x.view(-1, 1, groups, lanes // 4, words, 4)  # (R, 1, G, h, W, b): k = h*size/2 + 4m + b
        if self.bits == 4:  # all 8 lanes at once: inductor vectorises over the B rows
            weights = self._codes(self.codes) * self.scale.unsqueeze(2) + self.offset.unsqueeze(2)  # (rows/B, G, L, W, B)
            lanes_first = xs.transpose(-1, -2).reshape(-1, 1, groups, lanes, words, 1)  # (R, 1, G, L, W, 1)
            return (weights * lanes_first).sum((2, 3, 4)).flatten(1)  # (R, rows)
        # 8-bit: one term per lane, each a constant shift; at once, inductor would vectorise over
        # the 4 lanes (x is contiguous along them) instead of over the rows
        codes, mask = self.codes.view(torch.int32), (1 << self.bits) - 1  # (rows/B, G, W, B)
        total = 0
        for lane in range(lanes):
            weights = ((codes >> (8 * lane)) & mask).float() * self.scale + self.offset  # (rows/B, G, W, B)
            total = total + (weights * xs[:, :, :, 0, :, lane, None]).sum((2, 3))  # (R, rows/B, B)
        return total.flatten(1)  # (R, rows)

    def _codes(self, words: torch.Tensor) -> torch.Tensor:
        """The codes (..., L, W, B) as float32 of words (..., W, B): L = 32 / bits lanes per word."""
        lanes = torch.arange(32 // self.bits, device=words.device)
        shifts = (8 * (lanes % 4) + 4 * (lanes // 4)).to(torch.int32)[:, None, None]  # (L, 1, 1)
        return ((words.view(torch.int32).unsqueeze(-3) >> shifts) & ((1 << self.bits) - 1)).float()

    def share(self, other: QuantizedTensor) -> None:
        """Use `other`'s codes and scales (a head tied to its embedding)."""
        self.codes, self.scale, self.offset = other.codes, other.scale, other.offset
        self.__dict__.pop("_rows_cache", None)


class QuantizedLinear(QuantizedTensor):
    """y = x @ W.T + b with W quantized; the product and its bias in x's dtype."""

    product = staticmethod(F.linear)  # as `Linear`'s: the runner may swap in a faster one

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool) -> None:
        super().__init__(out_features, in_features, bits)
        self.out_features = out_features
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized(_scratch(self.rows * self.in_features, self.codes.device))
        y = self.product(x, weight.to(x.dtype))  # (..., T, out)
        return y if self.bias is None else y + self.bias.to(y.dtype)


_buffers = threading.local()


def _scratch(size: int, device: torch.device) -> torch.Tensor:
    """This thread's float32 buffer of at least `size` values on `device`, for one dequantized weight
    at a time (the engine's loop and a caller's own forward pass each have theirs)."""
    buffers = _buffers.__dict__.setdefault("by_device", {})
    buffer = buffers.get(device)
    if buffer is None or buffer.numel() < size:
        with torch.inference_mode(False):  # an ordinary tensor: written in inference mode or out of it
            buffer = buffers[device] = torch.empty(size, device=device)
    return buffer


class QuantizedEmbedding(QuantizedTensor):
    """An embedding table whose rows are dequantized as they are looked up."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 8) -> None:
        super().__init__(num_embeddings, embedding_dim, bits)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows_of(ids)  # (..., C)


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

    def load(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Take every quantized module's blocks out of `state` (file layout), hand them to the
        module, and point each tied head at its embedding's tensors."""
        for target in self.weights.values():
            module = model.get_submodule(target.module)
            module.load_blocks(*(state.pop(f"{target.module}.{key}") for key in ("codes", "scale", "offset")))
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
        if id(module.weight) in embedding_of and not isinstance(module, nn.Embedding):
            if f"{embedding_of[id(module.weight)]}.weight" not in weights:
                continue  # its embedding stays float, and so does the head that shares it
            tied[name] = embedding_of[id(module.weight)]
            new = QuantizedLinear(new.in_features, new.out_features, 8, bias=new.bias is not None)
        else:
            weights[f"{name}.weight"] = QuantizedWeight(name, new.bits, transposed)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return QuantizationPlan(weights, tied)


def _quantized(module: nn.Module, bits: int) -> tuple[QuantizedTensor | None, bool]:
    """The quantized stand-in for `module` (None if it has none, or no layout fits its width) and
    whether its weight is (in, out)."""
    if isinstance(module, nn.Embedding):
        if not group_size(module.embedding_dim, 8):
            return None, False
        return QuantizedEmbedding(module.num_embeddings, module.embedding_dim), False
    transposed = getattr(module, "transposed_weight", None)  # set by every projection a family may quantize
    if transposed is None:
        return None, False
    in_features, out_features = module.weight.shape if transposed else module.weight.shape[::-1]
    if not group_size(in_features, bits):
        bits = 8
    if not group_size(in_features, bits):
        return None, False
    return QuantizedLinear(in_features, out_features, bits, bias=module.bias is not None), transposed
