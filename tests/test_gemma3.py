"""The second real model, Gemma 3 270M: our forward pass against transformers' Gemma3ForCausalLM
on the same converted folder."""

from __future__ import annotations

import pytest
import torch

from nanoengine import Tokenizer, generate, load_model

PROMPTS = ["The capital of France is", "def quicksort(arr):\n", "Il était une fois"]


@pytest.fixture(scope="module")
def gemma3(gemma3_folder):
    return load_model(gemma3_folder), Tokenizer.from_folder(gemma3_folder)


@pytest.fixture(scope="module")
def gemma3_reference(gemma3_folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gemma3_folder, dtype=torch.float32).eval()


def test_bos_is_added(gemma3):
    _, tokenizer = gemma3
    assert tokenizer.encode("Hello")[0] == 2  # <bos>: without it the model degenerates


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_matches_transformers(gemma3, gemma3_reference, prompt):
    model, tokenizer = gemma3
    ids = tokenizer.encode(prompt)
    with torch.inference_mode():
        ours_last = model(torch.tensor([ids]), last_only=True)[0, -1]
        reference_last = gemma3_reference(torch.tensor([ids])).logits[0, -1]
        expected = gemma3_reference.generate(
            torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False
        )[0, len(ids) :].tolist()
    assert (ours_last - reference_last).abs().max().item() <= 1e-4
    assert [t.id for t in generate(model, ids, 16, eos_ids=())] == expected


def test_completion_api_serves_gemma3_by_name(gemma3):
    from nanoengine import Completion

    model, tokenizer = gemma3
    prompt = "The capital of France is"
    response = Completion.create(model_name="gemma-3-270m", prompt=prompt, max_new_tokens=8, temperature=0, timeout=300)
    ids = [t.id for t in generate(model, tokenizer.encode(prompt), 8)]
    assert response.output.text == tokenizer.decode(ids) and response.output.num_completion_tokens == len(ids)
