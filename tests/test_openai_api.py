"""The OpenAI-compatible routes, spoken to by the official `openai` client over a loopback socket."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import openai
import pytest
import requests
from test_server import running_server

import nanoengine
from nanoengine.server.common import ServerSettings
from conftest import wait_until  # noqa: E402

MODEL = nanoengine.DEFAULT_MODEL
PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
KEY = "s3cret"


@pytest.fixture(scope="module")
def server_url(smollm2_folder) -> Iterator[str]:
    with running_server(ServerSettings(api_key=KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def llm(smollm2_folder):
    return nanoengine.load(MODEL)


def test_models_lists_what_is_served(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "nanoengine"


def test_completion_matches_the_library(client, llm):
    expected = llm.complete(PROMPT, max_new_tokens=6, temperature=0)
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, user="ignored")
    assert response.object == "text_completion" and response.model == MODEL and response.id.startswith("cmpl-")
    [choice] = response.choices
    assert choice.text == expected.text and choice.index == 0 and choice.finish_reason == "length"
    assert response.usage.prompt_tokens == expected.num_prompt_tokens
    assert response.usage.completion_tokens == expected.num_completion_tokens == 6
    assert response.usage.total_tokens == expected.num_prompt_tokens + 6


def test_chat_matches_llm_chat(client, llm):
    expected = llm.chat(QUESTION, max_new_tokens=40, temperature=0)
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40, temperature=0)
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    [choice] = response.choices
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop" and expected.num_completion_tokens < 40  # it ended at end-of-sequence
    assert response.usage.prompt_tokens == expected.num_prompt_tokens


def test_a_chat_without_max_tokens_runs_to_its_end(client):
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}], temperature=0)
    assert response.choices[0].finish_reason == "stop" and 0 < response.usage.completion_tokens < 200


def test_max_completion_tokens_bounds_the_chat(client):
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=3, temperature=0)
    assert response.usage.completion_tokens == 3 and response.choices[0].finish_reason == "length"


def test_streamed_completion_joins_to_the_full_one(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert {c.id for c in chunks} == {chunks[0].id}


def test_streamed_chat_joins_to_the_full_one_and_reports_usage(client):
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0.8, seed=5)
    stream = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=12, temperature=0.8, seed=5, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_a_stream_is_server_sent_events_ending_in_done(server_url):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 3, "stream": True}
    with requests.post(f"{server_url}v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       stream=True, timeout=300) as response:  # fmt: skip
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_stop_ends_the_text_before_the_stop_string(client):
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stop=["."])
    choice = response.choices[0]
    assert choice.text == " Paris" and choice.finish_reason == "stop"
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40, temperature=0, stop="Paris")
    assert "Paris" not in chat.choices[0].message.content and chat.choices[0].finish_reason == "stop"


def test_the_same_seed_gives_the_same_text(client):
    def sample(seed: int) -> str:
        response = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                             seed=seed)  # fmt: skip
        return response.choices[0].text

    first = sample(11)
    assert sample(11) == first
    assert any(sample(seed) != first for seed in (12, 13, 14))


def test_n_samples_of_one_prompt(client):
    def three() -> list[str]:
        response = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10, temperature=1.0,
                                                  seed=21, n=3)  # fmt: skip
        assert [c.index for c in response.choices] == [0, 1, 2]
        assert 3 <= response.usage.completion_tokens <= 30  # the three samples' tokens, the prompt counted once
        return [c.message.content for c in response.choices]

    samples = three()
    assert len(set(samples)) > 1  # different samples, not one answer three times
    assert three() == samples  # and reproducible with the seed


def test_n_samples_streamed(client):
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=1.0, seed=3, n=3,
                                       stream=True)  # fmt: skip
    texts = {0: "", 1: "", 2: ""}
    finished = set()
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finished.add(choice.index)
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=1.0, seed=3, n=3)
    assert finished == {0, 1, 2}
    assert [texts[i] for i in range(3)] == [c.text for c in full.choices]


def test_completion_logprobs(client, llm):
    expected = llm.complete(PROMPT, max_new_tokens=5, temperature=0, return_token_log_probs=True)
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=1)
    logprobs = response.choices[0].logprobs
    assert logprobs.tokens == [t.token for t in expected.tokens]
    assert logprobs.token_logprobs == pytest.approx([t.log_prob for t in expected.tokens], abs=1e-5)
    assert [list(top) for top in logprobs.top_logprobs] == [[t] for t in logprobs.tokens]
    assert logprobs.text_offset[0] == 0 and all(lp <= 0 for lp in logprobs.token_logprobs)


def test_logprobs_zero_still_gives_the_chosen_tokens(client):
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=0)
    assert len(response.choices[0].logprobs.token_logprobs) == 3
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs(client):
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=0,
                                              logprobs=True, top_logprobs=2)  # fmt: skip
    content = response.choices[0].logprobs.content
    assert len(content) == 4 and "".join(t.token for t in content) == response.choices[0].message.content
    for token in content:
        assert token.logprob <= 0 and bytes(token.bytes).decode() == token.token
        assert token.top_logprobs[0].token == token.token and token.top_logprobs[0].logprob == token.logprob
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize(
    ("kwargs", "param", "complaint"),
    [
        ({"temperature": 5}, "temperature", "temperature"),
        ({"top_p": 0}, "top_p", "top_p"),
        ({"n": 0}, "n", "n must be"),
        ({"max_tokens": -1}, "max_tokens", "max_tokens"),
        ({"stop": [1, 2]}, "stop", "stop must be"),
        ({"messages": []}, "messages", "messages must be a non-empty list"),
        ({"messages": [{"role": "user", "content": 42}]}, "messages", r"messages\[0\]\['content'\]"),
        ({"top_logprobs": 3}, "top_logprobs", "needs logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ],
)
def test_a_bad_request_is_a_400_in_openai_shape(client, kwargs, param, complaint):
    request = {"model": MODEL, "messages": QUESTION, "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError, match=complaint) as caught:
        client.chat.completions.create(**request)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["type"] == "invalid_request_error" and error["param"] == param


def test_a_bad_body_is_a_400(server_url):
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    response = requests.post(f"{server_url}v1/completions", data="{not json", headers=headers, timeout=60)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    for prompt in ([[1, "x"]], [1.5], [], [-1], ""):
        response = requests.post(f"{server_url}v1/completions", json={"model": MODEL, "prompt": prompt}, headers=headers,
                                 timeout=60)  # fmt: skip
        assert response.status_code == 400 and response.json()["error"]["param"] == "prompt", prompt


def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError, match="does not exist") as caught:
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"


def test_a_wrong_key_is_a_401(server_url):
    wrong = openai.OpenAI(base_url=f"{server_url}v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
    assert caught.value.body["code"] == "invalid_api_key"
    response = requests.get(f"{server_url}v1/models", timeout=60)  # no key at all
    assert response.status_code == 401 and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_several_prompts_in_one_completion_request(client):
    response = client.completions.create(model=MODEL, prompt=[PROMPT, "1, 2, 3,"], max_tokens=3, temperature=0, n=2)
    texts = [c.text for c in response.choices]
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert texts[0] == texts[1] != texts[2] == texts[3]


def test_the_readme_openai_example_runs(server_url, capsys):
    from test_readme_examples import README, python_blocks

    example = python_blocks(README.read_text(encoding="utf-8"), "## Chat")[1]
    assert 'base_url="http://127.0.0.1:5005/v1", api_key="unused"' in example
    example = example.replace("http://127.0.0.1:5005/", server_url).replace('api_key="unused"', f'api_key="{KEY}"')
    exec(compile(example, "README.md OpenAI example", "exec"), {"__name__": "__main__"})
    assert "Paris" in capsys.readouterr().out



def test_a_stream_abandoned_mid_way_stops_every_sample(server_url, client):
    from nanoengine.api.models import get_model

    engine = get_model(MODEL).engine
    stream = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5, 6, 7, 8,", max_tokens=2000, temperature=0,
                                       n=2, stream=True)  # fmt: skip
    next(iter(stream))
    assert engine.active_requests == 2
    stream.close()  # closes the connection, as a client that goes away does
    # 2 x 2000 tokens take minutes here: the engine emptying at once means both generations stopped.
    assert wait_until(lambda: engine.active_requests == 0, seconds=30), "the generation went on after the client left"
    assert wait_until(lambda: requests.get(f"{server_url}healthz", timeout=10).json()["active_requests"] == 0, 30)


def test_a_failure_after_the_stream_began_is_an_error_event(smollm2_folder):
    endless = "1, 2, 3, 4, 5, 6, 7, 8,"  # greedy counting runs on for thousands of tokens, with no end-of-sequence
    with running_server(ServerSettings(request_timeout=1.0)) as url:
        quick = openai.OpenAI(base_url=f"{url}v1", api_key="unused", max_retries=0)
        stream = quick.completions.create(model=MODEL, prompt=endless, max_tokens=4000, temperature=0, stream=True)
        texts = []
        with pytest.raises(openai.APIError, match="timeout|timed out"):
            for chunk in stream:
                texts.append(chunk.choices[0].text)
    assert " 9, 10, 11, 12, 13, 14, 15, 16".startswith("".join(texts)[:30])  # what came before the error was whole


def test_a_template_that_refuses_the_messages_is_a_400(tiny_llama_folder):
    from test_tokenizer import checkpoint_with_template

    folder = checkpoint_with_template(tiny_llama_folder, "gemma-3-it.jinja")  # a tiny random model, Gemma's template
    with running_server(ServerSettings(models={"tiny": str(folder)})) as url:
        tiny = openai.OpenAI(base_url=f"{url}v1", api_key="unused", max_retries=0)
        not_alternating = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        with pytest.raises(openai.BadRequestError, match="roles must alternate") as caught:
            tiny.chat.completions.create(model="tiny", messages=not_alternating, max_tokens=2)
        assert caught.value.body["type"] == "invalid_request_error"
        fine = tiny.chat.completions.create(model="tiny", messages=not_alternating[:1], max_tokens=2, temperature=0)
        assert fine.usage.completion_tokens == 2


# --- log-probs as the API defines them: echo, top-N alternatives, finish_reason ---

ECHOED = ["The capital of France is", "1, 2, 3, 4,", "Photosynthesis turns light into"]


def reference_logprobs(reference, ids: list[int]):
    """transformers' log-probs (T, V) of every next token after each prefix of `ids`."""
    import torch

    with torch.inference_mode():
        return torch.log_softmax(reference(torch.tensor([ids])).logits[0].float(), dim=-1)


def assert_top_matches(ours: dict[str, float], expected, tokenizer, k: int) -> None:
    """Our first k alternatives are transformers' k likeliest: the same log-probs, and the same
    tokens wherever two log-probs are not tied."""
    values, ids = expected.topk(k)
    items = list(ours.items())[:k]
    assert [v for _, v in items] == pytest.approx(values.tolist(), abs=1e-4)
    for i, (text, _) in enumerate(items):
        tied = any(abs(values[i] - values[j]) < 1e-4 for j in range(k) if j != i)
        assert tied or text == tokenizer.decode([int(ids[i])], skip_special_tokens=False)


def test_echo_of_a_prompt_list_gives_every_token_and_its_alternatives_as_transformers(client, llm, smollm2_reference):
    response = client.completions.create(model=MODEL, prompt=ECHOED, echo=True, logprobs=5, max_tokens=0, temperature=0)
    assert [c.index for c in response.choices] == [0, 1, 2]
    total = 0
    for prompt, choice in zip(ECHOED, response.choices):
        ids = llm.tokenizer.encode(prompt)
        total += len(ids)
        expected = reference_logprobs(smollm2_reference, ids)  # row t predicts token t + 1
        logprobs = choice.logprobs
        assert choice.text == prompt and choice.finish_reason == "length"
        assert logprobs.tokens == [llm.tokenizer.decode([i], skip_special_tokens=False) for i in ids]
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # nothing predicts the first
        want = [float(expected[t, ids[t + 1]]) for t in range(len(ids) - 1)]
        assert logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
        for t in range(1, len(ids)):
            top = logprobs.top_logprobs[t]
            assert top[logprobs.tokens[t]] == logprobs.token_logprobs[t] and len(top) in (5, 6)  # the chosen one too
            assert_top_matches(top, expected[t - 1], llm.tokenizer, 5)
        assert logprobs.text_offset == [len("".join(logprobs.tokens[:t])) for t in range(len(ids))]
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (total, 0)


def test_echo_with_generation_continues_the_prompt(client, llm, smollm2_reference):
    expected = llm.complete(PROMPT, max_new_tokens=3, temperature=0)
    response = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=2, max_tokens=3, temperature=0)
    choice, ids = response.choices[0], llm.tokenizer.encode(PROMPT)
    assert choice.text == PROMPT + expected.text and len(choice.logprobs.tokens) == len(ids) + 3
    generated = llm.tokenizer.encode(PROMPT + expected.text)[len(ids) :]
    whole = reference_logprobs(smollm2_reference, ids + generated)
    for t in range(len(ids), len(ids) + 3):  # the engine's alternatives beside each generated token
        assert_top_matches(choice.logprobs.top_logprobs[t], whole[t - 1], llm.tokenizer, 2)
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=2, max_tokens=3,
                                              temperature=0, stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    offsets = [o for c in streamed if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == choice.logprobs.text_offset


def test_token_id_prompts_are_the_text_prompts(client, llm):
    ids = [llm.tokenizer.encode(p) for p in ECHOED[:2]]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0, echo=True, logprobs=0)
    by_text = client.completions.create(model=MODEL, prompt=ECHOED[:2], max_tokens=4, temperature=0, echo=True, logprobs=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    for a, b in zip(by_ids.choices, by_text.choices):  # the generated tokens' batches may differ: float noise
        assert a.logprobs.tokens == b.logprobs.tokens and a.logprobs.token_logprobs[0] is b.logprobs.token_logprobs[0] is None
        assert a.logprobs.token_logprobs[1:] == pytest.approx(b.logprobs.token_logprobs[1:], abs=1e-4)
    assert by_ids.usage == by_text.usage


def test_chat_top_logprobs_are_the_likeliest_tokens(client, llm, smollm2_reference):
    from nanoengine.api.chat import chat_prompt

    response = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3, temperature=0,
                                              logprobs=True, top_logprobs=5)  # fmt: skip
    ids = llm.tokenizer.encode(chat_prompt(llm.tokenizer, QUESTION))
    first = response.choices[0].logprobs.content[0]
    alternatives = {t.token: t.logprob for t in first.top_logprobs}
    assert len(first.top_logprobs) == 5 and all(bytes(t.bytes).decode() == t.token for t in first.top_logprobs)
    assert_top_matches(alternatives, reference_logprobs(smollm2_reference, ids)[-1], llm.tokenizer, 5)


def test_finish_reason_says_what_ended_the_sequence(client, llm):
    # " Paris" then ".": the stop string completes on the last token allowed, which is a stop, not the length
    stopped = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0, stop=["."])
    assert stopped.choices[0].text == " Paris" and stopped.choices[0].finish_reason == "stop"
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
    assert cut.choices[0].text == " Paris." and cut.choices[0].finish_reason == "length"
    # The chat's answer ends at its end-of-sequence token, here exactly its last allowed token.
    answer = llm.chat(QUESTION, max_new_tokens=60, temperature=0)
    assert answer.num_completion_tokens < 60
    for max_tokens, reason in [(answer.num_completion_tokens, "stop"), (answer.num_completion_tokens - 1, "length")]:
        chat = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=max_tokens, temperature=0)
        assert chat.choices[0].finish_reason == reason, max_tokens
        streamed = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=max_tokens,
                                                       temperature=0, stream=True))  # fmt: skip
        assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == reason


def test_what_the_engine_notes_for_openai_never_reaches_llmengines_json(smollm2_folder):
    chunks = list(nanoengine.Completion.create(MODEL, PROMPT, max_new_tokens=2, temperature=0, stream=True,
                                               return_token_log_probs=True))  # fmt: skip
    last = chunks[-1].output
    assert getattr(last, "finish_reason") == "length"  # noted on the chunk for the OpenAI routes
    assert set(last.dict()) == {"text", "finished", "num_prompt_tokens", "num_completion_tokens", "token"}
    assert set(last.dict()["token"]) == {"token", "log_prob"}


def test_a_token_that_ends_mid_character_has_its_own_bytes(llm):
    from nanoengine.server.openai_logprobs import token_bytes

    # 230 and 249 are the lone bytes 0x8c and 0x9f; 459 is " " plus the first two bytes of a three-byte character
    assert [llm.tokenizer.decode([i], skip_special_tokens=False) for i in (230, 459)] == ["\ufffd", " \ufffd"]
    assert [token_bytes(llm.tokenizer, i) for i in (230, 249, 459)] == [b"\x8c", b"\x9f", b" \xe2\x80"]
    assert token_bytes(llm.tokenizer, llm.tokenizer.encode("hi")[0]) == b"hi"
