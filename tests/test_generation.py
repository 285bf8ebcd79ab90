"""The token loop: stopping rules, length checks, determinism."""

from __future__ import annotations

import pytest
import torch

from nanoengine import InvalidParameterError, SamplingParams, generate, load_model
from nanoengine.engine.runner import ModelRunner


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import save_tiny_llama

    return load_model(save_tiny_llama(tmp_path_factory.mktemp("gen") / "tiny"))


def test_stops_after_max_new_tokens(tiny):
    assert len(list(generate(tiny, [1, 2, 3], 7, eos_ids=()))) == 7
    assert list(generate(tiny, [1, 2, 3], 0)) == []


def test_stops_after_yielding_an_eos_token(tiny):
    free = [t.id for t in generate(tiny, [1, 2, 3], 20, eos_ids=())]
    stop_at = free[5]
    stopped = [t.id for t in generate(tiny, [1, 2, 3], 20, eos_ids=[stop_at])]
    assert stopped == free[: free.index(stop_at) + 1]


def test_model_eos_ids_are_the_default(smollm2):
    tok = smollm2.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say hello."}])
    tokens = [t.id for t in generate(smollm2.model, tok.encode(prompt), 64)]
    assert tokens[-1] == 2 and 2 not in tokens[:-1]  # <|im_end|> ends the answer


def test_same_seed_same_tokens(tiny):
    params = SamplingParams(temperature=1.0, seed=1234)
    first = [t.id for t in generate(tiny, [1, 2, 3], 30, params, eos_ids=())]
    again = [t.id for t in generate(tiny, [1, 2, 3], 30, params, eos_ids=())]
    other = [t.id for t in generate(tiny, [1, 2, 3], 30, SamplingParams(temperature=1.0, seed=99), eos_ids=())]
    assert first == again and first != other


def test_logprobs_are_the_models_own(tiny):
    params = SamplingParams(temperature=1.5, seed=3)
    prompt = [4, 5, 6]
    steps = list(generate(tiny, prompt, 10, params, eos_ids=()))
    ids = prompt + [s.id for s in steps]
    with torch.inference_mode():
        logprobs = torch.log_softmax(tiny(torch.tensor([ids]))[0], -1)
    for i, step in enumerate(steps):
        assert step.logprob == pytest.approx(logprobs[len(prompt) - 1 + i, step.id].item(), abs=1e-5)


def test_too_long_a_request_is_refused_before_any_work(tiny):
    context = tiny.config.max_position_embeddings
    with pytest.raises(InvalidParameterError, match=f"exceeds the model's context of {context} tokens"):
        generate(tiny, [1] * 200, context - 199)
    assert len(list(generate(tiny, [1] * 200, context - 200, eos_ids=()))) == context - 200


@pytest.mark.parametrize("bad", [-1, 1.5, "3", None, True])
def test_bad_max_new_tokens(tiny, bad):
    with pytest.raises(InvalidParameterError, match="max_new_tokens"):
        generate(tiny, [1, 2], bad)


def test_empty_prompt(tiny):
    with pytest.raises(InvalidParameterError, match="at least one token"):
        generate(tiny, [], 5)


def test_closing_the_iterator_stops_the_work(tiny, monkeypatch):
    calls = []
    forward = type(tiny).forward
    monkeypatch.setattr(type(tiny), "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    tokens = generate(tiny, [1, 2, 3], 100, eos_ids=())
    for _ in range(5):
        next(tokens)
    tokens.close()
    assert len(calls) == 5  # the prefill plus four decode steps: nothing ran ahead


def test_cache_views_are_bucketed_and_capped(tiny):
    runner = ModelRunner(tiny, rows=1, max_len=600)
    assert [runner.bucket(n) for n in (1, 256, 257, 599)] == [256, 256, 512, 600]
    assert [runner.fit(n) for n in (1, 64, 65, 599)] == [64, 64, 128, 600]  # an eager pass's views


def test_generate_is_the_runner_driven_for_one_row(tiny, monkeypatch):
    decoded = []
    decode = ModelRunner.decode
    monkeypatch.setattr(ModelRunner, "decode", lambda self, seqs, *a: decoded.append(len(seqs)) or decode(self, seqs, *a))
    assert len(list(generate(tiny, [1, 2, 3], 6, eos_ids=()))) == 6
    assert decoded == [1] * 5


def test_no_autograd_state_leaks_to_the_caller(tiny):
    tokens = generate(tiny, [1, 2, 3], 3, eos_ids=())
    next(tokens)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
