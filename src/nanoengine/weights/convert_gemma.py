"""Gemma 3 (text) GGUF to Hugging Face: tensor names, norm weights, config, tokenizer.

What llama.cpp's converter (convert_hf_to_gguf.py, `Gemma3Model`) changed, and what it left:
- every RMSNorm weight (`*norm.weight`: the four per-layer norms, q/k norms and the final norm)
  is stored with 1 added, because Gemma computes `x * (1 + w)` and llama.cpp `x * w`; we subtract it;
- the q/k projections are *not* permuted (Gemma uses llama.cpp's NEOX rotary layout, which is the
  Hugging Face half-rotation one), and the sqrt(hidden size) embedding scale is applied at run
  time, not stored: both are left as they are;
- embedding rows past the tokenizer's vocabulary are dropped, so the vocabulary size is the
  number of tokens the file lists.
Some hyperparameters are not in the file at all: llama.cpp hard-codes them for the architecture
(llama-model.cpp, LLM_ARCH_GEMMA3), and so do we.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, processors

from .convert_common import add_gguf_special_tokens, float32_value, renamed_tensor
from ..errors import FetchError

LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",  # not post_attention_layernorm as in Llama
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

SLIDING_WINDOW_PATTERN = 6  # every 6th layer attends globally, the others within the window
LOCAL_ROPE_THETA = 10000.0  # rotary base of the sliding-window layers
GEMMA3_27B_LAYERS = 62  # the one size whose attention scale is not 1/sqrt(head_dim)
SPIECE_SPACE = "\u2581"  # SentencePiece's visible space, "▁"


def hf_config(meta: dict[str, Any], tied_embeddings: bool) -> dict[str, Any]:
    """`Gemma3ForCausalLM`'s config.json (model_type gemma3_text) from the GGUF metadata."""
    heads = int(meta["gemma3.attention.head_count"])
    hidden = int(meta["gemma3.embedding_length"])
    layers = int(meta["gemma3.block_count"])
    head_dim = int(meta.get("gemma3.attention.key_length", 256))
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": hidden,
        "intermediate_size": int(meta["gemma3.feed_forward_length"]),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("gemma3.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(meta["gemma3.context_length"]),
        "rms_norm_eps": float32_value(meta["gemma3.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float32_value(meta.get("gemma3.rope.freq_base", 1_000_000.0)),
        "rope_local_base_freq": LOCAL_ROPE_THETA,
        "rope_scaling": _rope_scaling(meta),
        "sliding_window": int(meta["gemma3.attention.sliding_window"]),
        "layer_types": [
            "full_attention" if (i + 1) % SLIDING_WINDOW_PATTERN == 0 else "sliding_attention" for i in range(layers)
        ],
        "query_pre_attn_scalar": hidden // heads if layers == GEMMA3_27B_LAYERS else head_dim,
        "final_logit_softcapping": _optional_float(meta, "gemma3.final_logit_softcapping"),
        "attn_logit_softcapping": _optional_float(meta, "gemma3.attn_logit_softcapping"),
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "tie_word_embeddings": tied_embeddings,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def _optional_float(meta: dict[str, Any], key: str) -> float | None:
    return float32_value(meta[key]) if key in meta else None


def _rope_scaling(meta: dict[str, Any]) -> dict[str, Any] | None:
    """Linear scaling of the global layers' positions (the 4B-27B models); none for the 270M."""
    kind = meta.get("gemma3.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise FetchError(f"Gemma 3 GGUF rope scaling {kind!r} is not supported (supported: linear)")
    return {"rope_type": "linear", "factor": float32_value(meta["gemma3.rope.scaling.factor"])}


def hf_tensor_name(gguf_name: str) -> str:
    return renamed_tensor(gguf_name, LAYER_TENSORS, GLOBAL_TENSORS)


def hf_tensor(name: str, weight: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """Undo llama.cpp's `+ 1` on the RMSNorm weights; every other tensor is stored as is."""
    return weight - np.float32(1.0) if name.endswith("norm.weight") else weight


def sentencepiece_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """The BPE-with-byte-fallback tokenizer Gemma's own tokenizer.json describes.

    The file lists no merges, so they are rebuilt from the vocabulary as transformers' GGUF reader
    does for Gemma: every split of a token into two tokens, the token's position in the file giving
    the merge its rank. Tokens made of spaces are stored with real spaces, while the normalizer turns
    text spaces into "▁", so they are looked up respelled. `<bos>` is added by the post-processor:
    without it the model degenerates.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind != "llama":
        raise FetchError(f"Gemma 3 GGUF tokenizer {kind!r} is not supported (supported: llama)")
    tokens = [SPIECE_SPACE * len(t) if t and not t.strip(" ") else t for t in meta["tokenizer.ggml.tokens"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = merges_from_vocabulary(tokens, vocab)
    unk = tokens[meta.get("tokenizer.ggml.unknown_token_id", 3)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", SPIECE_SPACE)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    add_gguf_special_tokens(tokenizer, meta)
    if meta.get("tokenizer.ggml.add_bos_token", True):
        bos_id = meta["tokenizer.ggml.bos_token_id"]
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    return tokenizer


def merges_from_vocabulary(tokens: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Each token's splits into two vocabulary tokens, earlier tokens first, longer left part first."""
    return [
        (token[:cut], token[cut:])
        for token in tokens
        for cut in range(len(token) - 1, 0, -1)
        if token[:cut] in vocab and token[cut:] in vocab
    ]
