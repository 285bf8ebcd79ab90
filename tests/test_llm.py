"""`nanoengine.load()` and its handle: batched generation from Python."""

from __future__ import annotations

import shutil

import pytest
import torch

import nanoengine
from conftest import wait_until
from nanoengine import Completion, InvalidParameterError, SamplingParams, generate
from nanoengine.research.interventions import intervene

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3,"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_folder) -> str:
    from conftest import save_tiny_llama

    folder = save_tiny_llama(tmp_path_factory.mktemp("llm") / "tiny", vocab_size=49152)
    shutil.copy(smollm2_folder / "tokenizer.json", folder)
    return str(folder)


def test_the_handle_is_the_model_that_completion_serves(smollm2_folder):
    llm = nanoengine.load("smollm2-135m-instruct")
    assert llm.model is nanoengine.load(smollm2_folder).model
    from nanoengine.api.models import get_model

    assert llm.engine is get_model(str(smollm2_folder)).engine
    assert llm.tokenizer.encode("Paris") == get_model(str(smollm2_folder)).tokenizer.encode("Paris")


def test_generate_returns_each_prompts_own_completion_in_order(smollm2_folder):
    llm = nanoengine.load(smollm2_folder)
    outs = llm.generate(PROMPTS, max_new_tokens=8, temperature=0)
    expected = [Completion.create(smollm2_folder, p, 8, 0, timeout=120).output for p in PROMPTS]
    assert [o.text for o in outs] == [e.text for e in expected]
    assert [o.num_prompt_tokens for o in outs] == [e.num_prompt_tokens for e in expected]
    assert llm.generate("The capital of France is", max_new_tokens=8, temperature=0)[0].text == outs[0].text


def test_a_seed_gives_each_prompt_its_own_reproducible_stream(tiny):
    llm = nanoengine.load(tiny)
    same = ["Hello"] * 3
    first = [o.text for o in llm.generate(same, max_new_tokens=10, temperature=1.0, seed=5)]
    assert len(set(first)) == 3  # seed + i: the three identical prompts are sampled apart
    assert [o.text for o in llm.generate(same, max_new_tokens=10, temperature=1.0, seed=5)] == first
    alone = Completion.create(tiny, "Hello", 10, 1.0, seed=6).output.text
    assert first[1] == alone


def test_every_prompt_and_parameter_is_checked_before_any_work(tiny):
    llm = nanoengine.load(tiny)
    steps = llm.engine.steps
    for kwargs, message in [
        (dict(prompts=["ok", ""]), "prompt"),
        (dict(prompts=["ok", 3]), "prompt"),
        (dict(prompts=["ok"], temperature=5), "temperature"),
        (dict(prompts=["ok"], max_new_tokens=10_000), "exceeds"),
        (dict(prompts=["ok"], colour="blue"), "unknown parameter.*colour"),
    ]:
        with pytest.raises(InvalidParameterError, match=message):
            llm.generate(**kwargs)
    assert llm.engine.steps == steps


def test_interventions_apply_to_every_generated_token(tiny):
    """Zeroing layer 0's MLP output changes the continuation, exactly as the same hook on the
    single-sequence loop does."""
    llm = nanoengine.load(tiny)
    zero = {"model.layers.0.mlp": torch.zeros_like}
    plain = [o.text for o in llm.generate(PROMPTS, max_new_tokens=12, temperature=0)]
    ablated = [o.text for o in llm.generate(PROMPTS, max_new_tokens=12, temperature=0, interventions=zero)]
    with intervene(llm.model, zero):
        expected = [
            llm.tokenizer.decode([t.id for t in generate(llm.model, llm.tokenizer.encode(p), 12, SamplingParams())])
            for p in PROMPTS
        ]
    assert ablated == expected and ablated != plain
    assert [o.text for o in llm.generate(PROMPTS, max_new_tokens=12, temperature=0)] == plain  # hooks gone


def test_complete_full_and_streamed(tiny):
    llm = nanoengine.load(tiny)
    full = llm.complete("Hello", max_new_tokens=6, temperature=0)
    chunks = list(llm.complete("Hello", stream=True, max_new_tokens=6, temperature=0))
    assert "".join(c.text for c in chunks) == full.text and chunks[-1].finished


def test_generate_as_completed_yields_every_prompt_once_as_it_finishes(tiny):
    llm = nanoengine.load(tiny)
    prompts = [f"Prompt number {i} says" + " more" * (5 * i) for i in range(6)]
    results = llm.generate(prompts, max_new_tokens=10, temperature=0, as_completed=True)
    got = list(results)
    assert sorted(index for index, _ in got) == list(range(6))
    in_order = llm.generate(prompts, max_new_tokens=10, temperature=0)
    assert [dict(got)[i].text for i in range(6)] == [o.text for o in in_order]


def test_closing_the_as_completed_iterator_stops_the_rest(tiny):
    llm = nanoengine.load(tiny)
    results = llm.generate([f"Long one {i}" for i in range(40)], max_new_tokens=200, temperature=0, as_completed=True)
    index, output = next(results)
    assert output.num_completion_tokens > 0
    results.close()
    assert wait_until(lambda: llm.engine.active_requests == 0, seconds=120)


def test_the_progress_bar_shows_prompts_and_tokens_per_second(tiny, capsys, caplog):
    llm = nanoengine.load(tiny)
    with caplog.at_level("INFO", logger="nanoengine.api.offline"):
        llm.generate([f"Bar {i}" for i in range(4)], max_new_tokens=3, temperature=0, progress=True)
    shown = capsys.readouterr().err + caplog.text
    assert "4/4" in shown or "4 of 4 prompts done" in shown
    assert "tok/s" in shown
