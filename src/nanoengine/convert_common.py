"""What every model family's GGUF conversion shares: metadata values and special tokens."""

from __future__ import annotations

from typing import Any

from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer

from .errors import FetchError

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
