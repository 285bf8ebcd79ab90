"""GGUF conversion details: tensor names and the q/k row permutation."""

from __future__ import annotations

import numpy as np
import pytest

from nanoengine import FetchError
from nanoengine.weights.convert import hf_tensor_name, unpermute_rows


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q and k rows (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@pytest.mark.parametrize("n_head, rows", [(9, 576), (3, 192), (1, 64)])
def test_unpermute_inverts_llama_cpp_permutation(n_head, rows):
    weight = np.random.default_rng(0).standard_normal((rows, 8)).astype(np.float32)
    assert np.array_equal(unpermute_rows(llama_cpp_permute(weight, n_head), n_head), weight)


def test_unpermute_restores_the_half_rotation_pairs():
    # One head of 4 rows: HF pairs row i with row i + 2; llama.cpp stores them interleaved.
    hf = np.arange(4, dtype=np.float32)[:, None]
    assert llama_cpp_permute(hf, 1)[:, 0].tolist() == [0, 2, 1, 3]
    assert unpermute_rows(llama_cpp_permute(hf, 1), 1)[:, 0].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "gguf, hf",
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight"),
        ("blk.3.ffn_norm.weight", "model.layers.3.post_attention_layernorm.weight"),
    ],
)
def test_tensor_names(gguf, hf):
    assert hf_tensor_name(gguf) == hf


def test_unknown_tensor_name():
    with pytest.raises(FetchError, match="blk.0.attn_sinks.weight"):
        hf_tensor_name("blk.0.attn_sinks.weight")


def test_real_model_config(smollm2):
    config = smollm2.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (30, 576, 9, 3)
    assert config.tie_word_embeddings and config.eos_token_ids == (2,) and config.rope_theta == 100000.0
    assert config.rms_norm_eps == 1e-5
