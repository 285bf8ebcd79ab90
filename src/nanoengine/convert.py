"""GGUF to a Hugging Face style folder: config.json, model.safetensors, tokenizer.json.

GGUF files keep llama.cpp's names and layouts. Three things differ from the Hugging Face
checkpoint the model was converted from, and are undone here:
- tensor names (`blk.0.attn_q.weight` is `model.layers.0.self_attn.q_proj.weight`);
- the rows of the q and k projections are permuted for llama.cpp's interleaved rotary layout;
- the tokenizer is stored as metadata arrays (vocabulary, merges, token types), not as JSON.
Quantized tensors are dequantized to float32 with the `gguf` package's reference code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from .errors import FetchError

logger = logging.getLogger(__name__)

LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# How each llama.cpp pre-tokenizer type splits text before byte-level BPE.
BYTE_LEVEL_SPLITS = {
    # Digits one by one, then the GPT-2 split (StarCoder-style vocabularies such as SmolLM's).
    "smollm": [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)],
    "starcoder": [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)],
    "gpt2": [pre_tokenizers.ByteLevel(add_prefix_space=False)],
    "default": [pre_tokenizers.ByteLevel(add_prefix_space=False)],
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every metadata field as a Python value (arrays as lists)."""
    return {key: field.contents() for key, field in reader.fields.items() if field.types}


def _round(value: float) -> float:
    """GGUF stores float32; `9.999999747378752e-06` was written as 1e-05."""
    return float(f"{value:.7g}")


def hf_config(meta: dict[str, Any], tied_embeddings: bool) -> dict[str, Any]:
    arch = meta["general.architecture"]
    if arch != "llama":
        raise FetchError(f"GGUF architecture {arch!r} is not supported by the converter (supported: llama)")
    heads = int(meta[f"{arch}.attention.head_count"])
    hidden = int(meta[f"{arch}.embedding_length"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(meta.get(f"{arch}.vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        "hidden_size": hidden,
        "intermediate_size": int(meta[f"{arch}.feed_forward_length"]),
        "num_hidden_layers": int(meta[f"{arch}.block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(meta[f"{arch}.context_length"]),
        "rms_norm_eps": _round(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": _round(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": tied_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved pairs back to the half-rotation layout)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_tensor_name(gguf_name: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")  # suffix: weight or bias
    if stem in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{suffix}"
    raise FetchError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart")


def hf_tensors(reader: GGUFReader, config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """Each tensor dequantized to float32, under its Hugging Face name and layout."""
    total = len(reader.tensors)
    for i, tensor in enumerate(reader.tensors, start=1):
        name = hf_tensor_name(tensor.name)
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        weight = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        if name.endswith("q_proj.weight"):
            weight = unpermute_rows(weight, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rows(weight, config["num_key_value_heads"])
        if i % max(1, total // 10) == 0 or i == total:
            logger.info("dequantized %d/%d tensors", i, total)
        yield name, np.ascontiguousarray(weight)


def byte_level_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """Byte-level BPE from the vocabulary, merges and pre-tokenizer type that the GGUF records."""
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise FetchError(f"GGUF tokenizer {meta.get('tokenizer.ggml.model')!r} is not supported (supported: gpt2)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in BYTE_LEVEL_SPLITS:
        raise FetchError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(BYTE_LEVEL_SPLITS)})")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(BYTE_LEVEL_SPLITS[pre])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types) if kind == USER_DEFINED]
    )
    return tokenizer


def tokenizer_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json: special tokens, BOS/EOS behaviour and the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None else None

    return {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": meta.get("tokenizer.chat_template"),
        "model_max_length": int(meta[f"{meta['general.architecture']}.context_length"]),
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def convert_gguf(gguf_path: str | Path, out_folder: str | Path) -> None:
    """Write the Hugging Face style checkpoint for `gguf_path` into `out_folder` (which must exist)."""
    out = Path(out_folder)
    reader = GGUFReader(str(gguf_path))
    meta = read_metadata(reader)
    config = hf_config(meta, tied_embeddings=not any(t.name == "output.weight" for t in reader.tensors))
    logger.info("converting %s: %d tensors", Path(gguf_path).name, len(reader.tensors))
    save_file(dict(hf_tensors(reader, config)), str(out / "model.safetensors"), metadata={"format": "pt"})
    byte_level_tokenizer(meta).save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_settings(meta))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    _write_json(out / "generation_config.json", generation)
    # config.json last: a folder is only taken for a checkpoint once it has one.
    _write_json(out / "config.json", config)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
