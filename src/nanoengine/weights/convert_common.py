"""What every model family's GGUF conversion shares: metadata values and special tokens."""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.gguf_reader import ReaderTensor
from tokenizers import AddedToken, Tokenizer

from ..errors import FetchError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types (tokenizer.ggml.token_type)


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every metadata field as a Python value (arrays as lists)."""
    return {key: field.contents() for key, field in reader.fields.items() if field.types}


def float32_value(value: float) -> float:
    """GGUF stores float32; `9.999999747378752e-06` was written as 1e-05."""
    return float(f"{value:.7g}")


def add_gguf_special_tokens(tokenizer: Tokenizer, meta: dict[str, Any]) -> None:
    """Keep the tokens llama.cpp always matches whole from being cut into pieces.

    Control tokens (`<|im_end|>`, `<start_of_turn>`) become special added tokens; user-defined ones
    (`<think>`, Gemma's runs of newlines) plain added tokens. Only tokens the model's vocabulary
    holds under the same spelling are added: any other would get a new id past the embedding.
    """
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = tokenizer.get_vocab(with_added_tokens=False)

    def added(kind: int, special: bool) -> list[AddedToken]:
        return [
            AddedToken(t, special=special, normalized=False)
            for t, k in zip(tokens, types)
            if k == kind and t in vocab
        ]

    tokenizer.add_special_tokens(added(CONTROL, special=True))
    tokenizer.add_tokens(added(USER_DEFINED, special=False))


def renamed_tensor(gguf_name: str, layer_tensors: dict[str, str], global_tensors: dict[str, str]) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.<layer_tensors["attn_q"]>.weight`; globals by stem."""
    stem, _, suffix = gguf_name.rpartition(".")  # suffix: weight or bias
    if stem in global_tensors:
        return f"{global_tensors[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in layer_tensors:
        return f"model.layers.{parts[1]}.{layer_tensors[parts[2]]}.{suffix}"
    raise FetchError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart")


def quantized_blocks(tensor: ReaderTensor) -> dict[str, np.ndarray] | None:
    """A Q4_1 or Q8_0 matrix's blocks as they are, in `quantize.py`'s layout: codes (rows, groups,
    16 packed bytes, or 32 bytes), float16 scale and offset (rows, groups); None for other types.

    A Q4_1 block is d, m, then 16 bytes of nibbles (value j low, j + 16 high): w = d * q + m.
    A Q8_0 block is d, then 32 int8 values: w = d * q, stored here as d * (q + 128) - 128 * d.
    """
    if len(tensor.shape) != 2 or tensor.tensor_type not in (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0):
        return None
    rows, columns = int(tensor.shape[1]), int(tensor.shape[0])  # GGUF lists the innermost dimension first
    block = 20 if tensor.tensor_type == GGMLQuantizationType.Q4_1 else 34
    data = np.asarray(tensor.data).reshape(rows, columns // 32, block)
    scale = data[..., 0:2].copy().view(np.float16)[..., 0]
    if block == 20:
        offset = data[..., 2:4].copy().view(np.float16)[..., 0]
        return {"codes": data[..., 4:].copy(), "scale": scale, "offset": offset}
    codes = (data[..., 2:].copy().view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return {"codes": codes, "scale": scale, "offset": (scale.astype(np.float32) * -128).astype(np.float16)}
