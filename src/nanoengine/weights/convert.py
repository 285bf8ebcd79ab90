"""GGUF to a Hugging Face style folder: config.json, model.safetensors, tokenizer.json.

GGUF files keep llama.cpp's names and layouts, and the tokenizer is stored as metadata arrays
(vocabulary, merges, token types), not as JSON. This module holds the driver, which dequantizes
every tensor to float32 with the `gguf` package's reference code, and the `Family` table of what
differs per architecture (`general.architecture`): config.json, tensor names, tensor fixes and
the tokenizer. The Llama family lives here; Gemma 3 in `convert_gemma`.

Llama GGUFs differ from the Hugging Face checkpoint they were converted from in three ways:
- tensor names (`blk.0.attn_q.weight` is `model.layers.0.self_attn.q_proj.weight`);
- the rows of the q and k projections are permuted for llama.cpp's interleaved rotary layout;
- the byte-level BPE tokenizer's pre-tokenizer is only named (`tokenizer.ggml.pre`).
"""

from __future__ import annotations

import json
import logging
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from . import convert_gemma
from .convert_common import add_gguf_special_tokens, float32_value, quantized_blocks, read_metadata, renamed_tensor
from ..errors import FetchError

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


def hf_config(meta: dict[str, Any], tied_embeddings: bool) -> dict[str, Any]:
    heads = int(meta["llama.attention.head_count"])
    hidden = int(meta["llama.embedding_length"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": int(meta.get("llama.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(meta["llama.context_length"]),
        "rms_norm_eps": float32_value(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float32_value(meta.get("llama.rope.freq_base", 10000.0)),
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
    return renamed_tensor(gguf_name, LAYER_TENSORS, GLOBAL_TENSORS)


def hf_tensor(name: str, weight: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    if name.endswith("q_proj.weight"):
        return unpermute_rows(weight, config["num_attention_heads"])
    if name.endswith("k_proj.weight"):
        return unpermute_rows(weight, config["num_key_value_heads"])
    return weight


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
    add_gguf_special_tokens(tokenizer, meta)
    return tokenizer


@dataclass(frozen=True)
class Family:
    """What differs per architecture when a GGUF becomes a Hugging Face folder."""

    config: Callable[[dict[str, Any], bool], dict[str, Any]]  # (metadata, tied embeddings) -> config.json
    tensor_name: Callable[[str], str]  # GGUF tensor name -> Hugging Face name
    tensor: Callable[[str, np.ndarray, dict[str, Any]], np.ndarray]  # (HF name, float32 weight, config) -> weight
    tokenizer: Callable[[dict[str, Any]], Tokenizer]


FAMILIES = {
    "llama": Family(hf_config, hf_tensor_name, hf_tensor, byte_level_tokenizer),
    "gemma3": Family(
        convert_gemma.hf_config,
        convert_gemma.hf_tensor_name,
        convert_gemma.hf_tensor,
        convert_gemma.sentencepiece_tokenizer,
    ),
}


def family_of(meta: dict[str, Any]) -> Family:
    arch = meta["general.architecture"]
    if arch not in FAMILIES:
        supported = ", ".join(FAMILIES)
        raise FetchError(f"GGUF architecture {arch!r} is not supported by the converter (supported: {supported})")
    return FAMILIES[arch]


def hf_tensors(reader: GGUFReader, family: Family, config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """Each tensor dequantized to float32, under its Hugging Face name and layout."""
    total = len(reader.tensors)
    for i, tensor in enumerate(reader.tensors, start=1):
        name = family.tensor_name(tensor.name)
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        weight = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        if i % max(1, total // 10) == 0 or i == total:
            logger.info("dequantized %d/%d tensors", i, total)
        yield name, np.ascontiguousarray(family.tensor(name, weight, config))


def quantized_tensors(reader: GGUFReader, family: Family, config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """The Q4_1 and Q8_0 matrices' blocks taken as they are (see `quantized_blocks`), under the
    names of the quantized modules that load them (`<module>.codes`, `.scale`, `.offset`).

    Only a family change that moves whole rows (the q/k un-permutation) can be applied to blocks;
    a matrix whose change is anything else is left out, to be quantized at load time.
    """
    for tensor in reader.tensors:
        blocks = quantized_blocks(tensor)
        if blocks is None:
            continue
        name = family.tensor_name(tensor.name)
        rows = blocks["scale"].shape[0]
        order = family.tensor(name, np.arange(rows, dtype=np.float32)[:, None], config)[:, 0].astype(np.int64)
        if sorted(order.tolist()) != list(range(rows)):
            continue
        module = name.removesuffix(".weight")
        for key, value in blocks.items():
            yield f"{module}.{key}", np.ascontiguousarray(value[order])


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
    family = family_of(meta)
    config = family.config(meta, not any(t.name == "output.weight" for t in reader.tensors))
    logger.info("converting %s: %d tensors", Path(gguf_path).name, len(reader.tensors))
    save_file(dict(hf_tensors(reader, family, config)), str(out / "model.safetensors"), metadata={"format": "pt"})
    blocks = dict(quantized_tensors(reader, family, config))
    if blocks:  # loaded by dtype="int4" and "int8" as they are: exact, and no quantizing at load time
        save_file(blocks, str(out / "model.blocks.safetensors"), metadata={"format": "pt"})
    family.tokenizer(meta).save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_settings(meta))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    _write_json(out / "generation_config.json", generation)
    # config.json last: a folder is only taken for a checkpoint once it has one.
    _write_json(out / "config.json", config)
    # safetensors writes its file 0600; give it the mode every other file got (0644 under umask 022).
    for weights in (out / "model.safetensors", out / "model.blocks.safetensors"):
        if weights.exists():
            weights.chmod(stat.S_IMODE((out / "config.json").stat().st_mode))


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
