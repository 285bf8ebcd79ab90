"""Gemma 3 270M converted from its GGUF, against what `transformers` makes of the same GGUF.

`transformers` can load a GGUF itself (it dequantizes and undoes llama.cpp's changes on its own),
so the converted folder, loaded by `Gemma3ForCausalLM`, must compute what that load computes, and
our tokenizer.json must encode as transformers' GGUF tokenizer does. Each reference is loaded once
per module: the float32 model is about 1 GB, and loading the GGUF through transformers takes a minute.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nanoengine import Tokenizer
from nanoengine.weights.convert_gemma import hf_config, hf_tensor, hf_tensor_name, merges_from_vocabulary
from nanoengine.weights.registry import REGISTRY

GGUF_FILE = REGISTRY["gemma-3-270m"].source.gguf_file

PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "1, 2, 3, 4,"]

VARIED_STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n\treturn a + b\n\n\nclass  Foo:\n    pass",
    "    four spaces,\ttab,\t\ttwo tabs,   three spaces   ",
    "\t\t\tindented with tabs\n        and with eight spaces",
    "Emoji: 😀🎉👩‍💻🇫🇷",
    "中文文本，日本語のテキスト，한국어 텍스트",
    "Café, naïve, résumé, Ångström, Straße, façade",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text after a written bos, <eos> and <pad>",
    "<b>bold</b> <table><tr><td>cell</td></tr></table>",
    "Numbers: 3.14159, 1,000,000, 2024-11-26, 0x1F",
    "Mixed\r\nline\rendings\n\n\n",
    "αβγ δεζ — “quotes” and ‘apostrophes’ …",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and \x00\x01 control characters",
    "",
    " ",
    "a" * 300,
]


@pytest.fixture(scope="module")
def ours(gemma3_folder):
    from transformers import Gemma3ForCausalLM

    return Gemma3ForCausalLM.from_pretrained(gemma3_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(gemma3_folder):
    """transformers' own reading of the GGUF file kept in the folder."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gemma3_folder, gguf_file=GGUF_FILE, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference_tokenizer(gemma3_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma3_folder, gguf_file=GGUF_FILE)


@pytest.fixture(scope="module")
def tokenizer(gemma3_folder) -> Tokenizer:
    return Tokenizer.from_folder(gemma3_folder)


def test_config_is_the_published_gemma_3_270m(gemma3_folder, ours):
    config = json.loads((gemma3_folder / "config.json").read_text())
    sliding, full = "sliding_attention", "full_attention"
    published = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": 262144,
        "hidden_size": 640,
        "intermediate_size": 2048,
        "num_hidden_layers": 18,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "sliding_window": 512,
        "layer_types": ([sliding] * 5 + [full]) * 3,
        "query_pre_attn_scalar": 256,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    }
    assert {key: config.get(key) for key in published} == published
    rope = ours.config.rope_parameters  # how transformers read the two rotary bases
    assert rope["full_attention"]["rope_theta"] == 1e6 and rope["sliding_attention"]["rope_theta"] == 1e4


def test_licence_terms_travel_with_the_weights(gemma3_folder):
    assert "Gemma" in (gemma3_folder / "GEMMA_TERMS.html").read_text(encoding="utf-8")


def test_weights_equal_transformers_reading_of_the_gguf(ours, reference):
    theirs = reference.state_dict()
    mine = ours.state_dict()
    assert mine.keys() == theirs.keys()
    worst = max((mine[k] - theirs[k]).abs().max().item() for k in mine)
    assert worst <= 1e-6


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers_reading_of_the_gguf(ours, reference, tokenizer, prompt):
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        difference = (ours(ids).logits - reference(ids).logits).abs().max().item()
    assert difference < 1e-4


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuations_match(ours, reference, tokenizer, prompt):
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        mine = ours.generate(ids, max_new_tokens=12, do_sample=False)
        theirs = reference.generate(ids, max_new_tokens=12, do_sample=False)
    assert mine.tolist() == theirs.tolist()


def test_the_model_counts_on(ours, tokenizer):
    """A sanity check that both loads are right, not merely equally wrong (a missed `+ 1` on the
    norm weights or a wrong rotary layout turns this into noise)."""
    ids = torch.tensor([tokenizer.encode("1, 2, 3, 4,")])
    with torch.no_grad():
        out = ours.generate(ids, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1] :].tolist()).startswith(" 5, 6, 7")


@pytest.mark.parametrize("text", VARIED_STRINGS)
def test_ids_match_transformers_gguf_tokenizer(tokenizer, reference_tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids == reference_tokenizer(text)["input_ids"]
    assert ids[0] == 2  # <bos>, added by tokenizer.json's post-processor
    assert tokenizer.decode(ids[1:], skip_special_tokens=False) == text


def test_special_tokens_stay_whole(tokenizer):
    ids = tokenizer.encode("<start_of_turn>user\nHi<end_of_turn>", add_special_tokens=False)
    assert ids[0] == tokenizer.token_to_id("<start_of_turn>") == 105
    assert ids[-1] == tokenizer.token_to_id("<end_of_turn>") == 106
    assert tokenizer.decode(ids) == "user\nHi"


@pytest.mark.parametrize(
    "gguf, hf",
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
        ("blk.0.attn_q_norm.weight", "model.layers.0.self_attn.q_norm.weight"),
        ("blk.2.post_attention_norm.weight", "model.layers.2.post_attention_layernorm.weight"),
        ("blk.3.ffn_norm.weight", "model.layers.3.pre_feedforward_layernorm.weight"),
        ("blk.17.post_ffw_norm.weight", "model.layers.17.post_feedforward_layernorm.weight"),
        ("blk.5.attn_output.weight", "model.layers.5.self_attn.o_proj.weight"),
    ],
)
def test_tensor_names(gguf, hf):
    assert hf_tensor_name(gguf) == hf


def test_only_norm_weights_lose_llama_cpps_plus_one():
    weight = np.full((4, 4), 1.25, dtype=np.float32)
    norms = ("model.norm.weight", "model.layers.0.self_attn.k_norm.weight", "model.layers.1.input_layernorm.weight")
    for name in norms:
        assert np.array_equal(hf_tensor(name, weight, {}), weight - 1)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        assert hf_tensor(name, weight, {}) is weight  # no q/k permutation, no embedding scale


def test_merges_rank_by_position_in_the_vocabulary():
    tokens = ["a", "b", "c", "ab", "abc", "bc"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert merges_from_vocabulary(tokens, vocab) == [("a", "b"), ("ab", "c"), ("a", "bc"), ("b", "c")]


def test_what_the_file_does_not_say_is_what_llama_cpp_assumes():
    meta = {
        "gemma3.attention.head_count": 32,
        "gemma3.embedding_length": 5376,
        "gemma3.block_count": 62,  # the 27B, whose attention scale is hidden/heads, not head_dim
        "gemma3.attention.key_length": 128,
        "gemma3.feed_forward_length": 21504,
        "gemma3.context_length": 131072,
        "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
        "gemma3.attention.sliding_window": 1024,
        "gemma3.rope.scaling.type": "linear",
        "gemma3.rope.scaling.factor": 8.0,
        "tokenizer.ggml.tokens": ["<pad>"] * 10,
    }
    config = hf_config(meta, tied_embeddings=True)
    assert config["query_pre_attn_scalar"] == 168
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert config["rope_local_base_freq"] == 10000.0
    assert [i for i, kind in enumerate(config["layer_types"]) if kind == "full_attention"] == list(range(5, 62, 6))
