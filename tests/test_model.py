"""The hand-written decoder against transformers' LlamaForCausalLM, on tiny random configs and
on the real SmolLM2 weights."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_llama

from nanoengine import KVCache, load_model
from nanoengine.engine.compiling import in_eager_form
from nanoengine.engine.generation import generate

TINY_VARIANTS = {
    "gqa-untied": dict(),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "gqa-tied-theta500k": dict(tie_word_embeddings=True, rope_theta=500000.0),
    "mqa-theta1k": dict(num_key_value_heads=1, rope_theta=1000.0),
    "llama3-rope-scaling": dict(
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
}


def reference_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    reference = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        return reference(ids).logits


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_logits_match_transformers(tmp_path, variant):
    folder = save_tiny_llama(tmp_path / variant, **TINY_VARIANTS[variant])
    ids = torch.randint(0, 320, (2, 100), generator=torch.Generator().manual_seed(1))
    ours = load_model(folder)
    with torch.inference_mode():
        logits = ours(ids)
    assert (logits - reference_logits(folder, ids)).abs().max().item() <= 1e-5


def test_tied_head_shares_the_embedding(tmp_path):
    model = load_model(save_tiny_llama(tmp_path / "tied", tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_prefill_into_cache_equals_uncached_forward(tiny_llama_folder):
    model = load_model(tiny_llama_folder)
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(2))
    cache = KVCache(model.config, 1, 64, torch.float32, "cpu")
    with torch.inference_mode():
        cached = model(ids, torch.arange(40), cache)
        uncached = model(ids)
    assert (cached - uncached).abs().max().item() <= 1e-5


def test_cached_greedy_decoding_equals_full_recomputation(tiny_llama_folder):
    """50 greedy steps from the KV cache give the tokens (and logits) of recomputing everything."""
    model = load_model(tiny_llama_folder)
    prompt = [5, 17, 42, 99, 3]
    cached = list(generate(model, prompt, 50, eos_ids=()))
    ids = list(prompt)
    with torch.inference_mode():
        for step in cached:
            logits = model(torch.tensor([ids]))[0, -1]  # the whole sequence, no cache
            assert int(torch.argmax(logits)) == step.id
            assert abs(torch.log_softmax(logits, -1)[step.id].item() - step.logprob) <= 1e-5
            ids.append(step.id)
    assert len(cached) == 50


def test_decode_steps_keep_static_shapes(tiny_llama_folder):
    """The cache never grows: a decode step writes in place, whatever the position."""
    model = load_model(tiny_llama_folder)
    cache = KVCache(model.config, 1, 32, torch.float32, "cpu")
    storage = cache.k.data_ptr()
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), torch.arange(3), cache)
        for pos in range(3, 10):
            model(torch.tensor([[pos]]), torch.tensor([pos]), cache, last_only=True)
    assert cache.k.shape[3] == 32 and cache.k.data_ptr() == storage
    assert cache.k[:, :, :, 10:].abs().sum() == 0  # nothing written past the last position


# The real model: greedy continuations and last-position logits against transformers.
REAL_PROMPTS = {
    "plain": "The history of the printing press begins",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "chat": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nGive me three tips for learning to cook.<|im_end|>\n<|im_start|>assistant\n",
    "french": "La capitale de la France est une ville célèbre pour",
    "emoji": "My favourite emojis are 🎉, 🐍 and",
    "long": " ".join(
        f"Paragraph {i}: the committee reviewed item {i} of the budget, discussed its costs and agreed to revisit it."
        for i in range(20)
    )
    + " In summary, the committee",
}


@pytest.mark.parametrize("name", REAL_PROMPTS)
def test_real_model_matches_transformers(smollm2, smollm2_reference, name):
    prompt_ids = smollm2.tokenizer.encode(REAL_PROMPTS[name])
    if name == "long":
        assert len(prompt_ids) >= 300
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        ours_last = smollm2.model(ids, last_only=True)[0, -1]
        engines_last = in_eager_form(smollm2.model)(ids, last_only=True)[0, -1]  # oneDNN's products
        reference_last = smollm2_reference(ids).logits[0, -1]
        expected = smollm2_reference.generate(
            ids, max_new_tokens=48, min_new_tokens=48, do_sample=False, pad_token_id=2
        )[0, len(prompt_ids) :].tolist()
    assert (ours_last - reference_last).abs().max().item() <= 1e-4
    assert (engines_last - reference_last).abs().max().item() <= 1e-4
    ours = [t.id for t in generate(smollm2.model, prompt_ids, 48, eos_ids=())]
    assert ours == expected
