"""The REST server, spoken to by the real, unchanged `llmengine` client over a loopback socket.

Servers run in-process (uvicorn in a thread, on a free port) so that the tests can see the
worker threads; `test_cli.py` starts `nanoengine serve` as a real process.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

os.environ.setdefault("LLM_ENGINE_DISABLE_VERSION_CHECK", "true")  # importing llmengine asks PyPI otherwise

import llmengine  # noqa: E402
from llmengine.errors import BadRequestError, NotFoundError, UnauthorizedError  # noqa: E402

import nanoengine  # noqa: E402
from nanoengine.server.app import uvicorn_server  # noqa: E402
from nanoengine.server.common import ServerSettings, ServerSetupError, served_models  # noqa: E402
from conftest import wait_until  # noqa: E402

# The client's own use of aiohttp's deprecated BasicAuth is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:llmengine")

MODEL = nanoengine.DEFAULT_MODEL
PROMPT = "The capital of France is"
ENDLESS = "1, 2, 3, 4, 5, 6, 7, 8,"  # greedy counting runs past 400 tokens, with no end-of-sequence
README = Path(__file__).resolve().parents[1] / "README.md"


@contextmanager
def running_server(settings: ServerSettings) -> Iterator[str]:
    """An in-process uvicorn server on a free loopback port; yields its base URL."""
    server = uvicorn_server(settings, "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module")
def server_url(smollm2_folder) -> Iterator[str]:
    with running_server(ServerSettings()) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server_url(smollm2_folder) -> Iterator[str]:
    with running_server(ServerSettings(api_key="s3cret")) as url:
        yield url


@pytest.fixture
def client(server_url, monkeypatch):
    """The llmengine client, pointed at the server as its users point it: by environment."""
    monkeypatch.setenv("LLM_ENGINE_BASE_PATH", server_url)
    monkeypatch.delenv("SCALE_API_KEY", raising=False)
    return llmengine


@functools.cache
def library_greedy(prompt: str, max_new_tokens: int) -> nanoengine.CompletionSyncV1Response:
    return nanoengine.Completion.create(MODEL, prompt, max_new_tokens, temperature=0, timeout=120)


def engine_busy() -> bool:
    """Whether the served model's engine still holds a request (running or waiting)."""
    from nanoengine.api.models import get_model

    return get_model(MODEL).engine.active_requests > 0



def test_create_matches_the_library(client):
    expected = library_greedy(PROMPT, 6)
    response = client.Completion.create(model=MODEL, prompt=PROMPT, max_new_tokens=6, temperature=0)
    assert isinstance(response, llmengine.CompletionSyncResponse)
    assert response.output.text == expected.output.text
    assert response.output.num_completion_tokens == expected.output.num_completion_tokens
    assert response.output.num_prompt_tokens == expected.output.num_prompt_tokens


def test_create_stream_matches_the_library(client):
    expected = library_greedy(PROMPT, 6)
    chunks = list(client.Completion.create(model=MODEL, prompt=PROMPT, max_new_tokens=6, temperature=0, stream=True))
    assert "".join(c.output.text for c in chunks) == expected.output.text
    assert [c.output.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert len({c.request_id for c in chunks}) == 1
    assert chunks[-1].output.num_completion_tokens == expected.output.num_completion_tokens


def test_acreate_and_the_async_stream_match_the_library(client):
    expected = library_greedy(PROMPT, 6).output.text

    async def both() -> tuple[str, str]:
        response = await client.Completion.acreate(model=MODEL, prompt=PROMPT, max_new_tokens=6, temperature=0)
        stream = await client.Completion.acreate(model=MODEL, prompt=PROMPT, max_new_tokens=6, temperature=0, stream=True)
        return response.output.text, "".join([chunk.output.text async for chunk in stream])

    assert asyncio.run(both()) == (expected, expected)


def test_request_options_reach_the_model(client):
    response = client.Completion.create(
        model=MODEL, prompt=PROMPT, max_new_tokens=4, temperature=0, stop_sequences=["."], return_token_log_probs=True
    )
    expected = nanoengine.Completion.create(MODEL, PROMPT, 4, temperature=0, stop_sequences=["."], return_token_log_probs=True)
    assert response.output.text == expected.output.text and "." not in response.output.text
    assert [t.token for t in response.output.tokens] == [t.token for t in expected.output.tokens]


def test_concurrent_streams_each_get_their_own_text(client):
    """Eight streams at once, batched by the engine: each equal to its own solo text."""
    prompts = [
        "The capital of France is", "One, two, three,", "def fibonacci(n):", "My favourite colour is",
        "Once upon a time", "The best way to learn", "import numpy as", "Water boils at",
    ]  # fmt: skip
    expected = [library_greedy(p, 4).output.text for p in prompts]
    assert len(set(expected)) == 8

    async def one(prompt: str) -> str:
        stream = await client.Completion.acreate(model=MODEL, prompt=prompt, max_new_tokens=4, temperature=0, stream=True)
        return "".join([chunk.output.text async for chunk in stream])

    async def all_at_once() -> list[str]:
        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(all_at_once()) == expected


def test_model_list_and_get(client):
    assert [m.name for m in client.Model.list().model_endpoints] == [MODEL]
    model = client.Model.get(MODEL)
    assert model.name == MODEL and model.status == "READY"
    with pytest.raises(NotFoundError):
        client.Model.get("no-such-model")


def test_errors_surface_as_the_clients_own(client):
    with pytest.raises(NotFoundError, match="no-such-model"):
        client.Completion.create(model="no-such-model", prompt=PROMPT)
    with pytest.raises(BadRequestError, match="top_k"):
        client.Completion.create(model=MODEL, prompt=PROMPT, top_k=0)
    with pytest.raises(BadRequestError, match="prompt"):
        list(client.Completion.create(model=MODEL, prompt="", stream=True))
    with pytest.raises(BadRequestError, match="guided_regex"):
        client.Completion.create(model=MODEL, prompt=PROMPT, guided_regex="a+")


def test_a_key_is_required_once_configured(keyed_server_url, monkeypatch):
    monkeypatch.setenv("LLM_ENGINE_BASE_PATH", keyed_server_url)
    monkeypatch.setenv("SCALE_API_KEY", "wrong")
    with pytest.raises(UnauthorizedError):
        llmengine.Completion.create(model=MODEL, prompt=PROMPT, max_new_tokens=1)
    with pytest.raises(UnauthorizedError):
        asyncio.run(llmengine.Completion.acreate(model=MODEL, prompt=PROMPT, max_new_tokens=1))
    monkeypatch.setenv("SCALE_API_KEY", "s3cret")
    assert llmengine.Model.list().model_endpoints[0].name == MODEL
    url = f"{keyed_server_url}v1/llm/model-endpoints"
    assert requests.get(url, headers={"x-api-key": "s3cret"}, timeout=10).status_code == 200
    assert requests.get(url, auth=("s3cret", ""), timeout=10).status_code == 200
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(f"{keyed_server_url}healthz", timeout=10).status_code == 200


def test_malformed_and_oversized_bodies_are_refused(server_url):
    url = f"{server_url}v1/llm/completions-sync?model_endpoint_name={MODEL}"
    bad = requests.post(url, data=b'{"prompt": "hi",', headers={"content-type": "application/json"}, timeout=10)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["detail"]
    assert requests.post(url, json=["a", "list"], timeout=10).status_code == 400
    huge = requests.post(url, json={"prompt": "x" * (2 << 20)}, timeout=10)
    assert huge.status_code == 413
    missing = requests.post(f"{server_url}v1/llm/completions-sync", json={"prompt": "hi"}, timeout=10)
    assert missing.status_code == 400 and "model_endpoint_name" in missing.json()["detail"]
    fine = requests.post(url, json={"prompt": PROMPT, "max_new_tokens": 2, "temperature": 0}, timeout=60)
    assert fine.status_code == 200 and fine.json()["output"]["num_completion_tokens"] == 2


def test_a_stream_abandoned_mid_way_stops_its_generation(client, server_url):
    async def read_two_chunks_and_leave() -> list[str]:
        stream = await client.Completion.acreate(model=MODEL, prompt=ENDLESS, max_new_tokens=400, temperature=0, stream=True)
        texts = [(await stream.__anext__()).output.text for _ in range(2)]
        await stream.aclose()  # closes the connection, as a client that goes away does
        return texts

    assert len(asyncio.run(read_two_chunks_and_leave())) == 2
    # 400 tokens take half a minute here: the engine letting go at once means the generation stopped.
    assert wait_until(lambda: not engine_busy(), seconds=3), "the generation went on after the client left"
    assert requests.get(f"{server_url}healthz", timeout=10).json()["active_requests"] == 0


def test_a_sync_request_whose_client_gives_up_stops_its_generation(client):
    with pytest.raises(requests.exceptions.Timeout):
        client.Completion.create(model=MODEL, prompt=ENDLESS, max_new_tokens=400, temperature=0, timeout=1)
    assert wait_until(lambda: not engine_busy(), seconds=3), "the generation went on after the client left"


def test_a_failure_after_the_stream_began_is_a_final_error_chunk(smollm2_folder, monkeypatch):
    with running_server(ServerSettings(request_timeout=2.0)) as url:
        monkeypatch.setenv("LLM_ENGINE_BASE_PATH", url)
        chunks = list(llmengine.Completion.create(model=MODEL, prompt=ENDLESS, max_new_tokens=400, temperature=0, stream=True))
    assert all(c.output is not None and c.error is None for c in chunks[:-1])
    assert chunks[-1].output is None and chunks[-1].error.status_code == 500
    assert "timeout" in chunks[-1].error.content.error and chunks[-1].error.content.timestamp


def readme_example() -> str:
    """The Python block under the README's "use your existing llmengine code" heading."""
    text = README.read_text(encoding="utf-8") if README.is_file() else ""
    found = re.search(r"existing llmengine code.*?```python\n(.*?)```", text, flags=re.IGNORECASE | re.DOTALL)
    if found is None:
        pytest.fail("README.md has no 'use your existing llmengine code' section")
    return found.group(1)


def test_the_readme_example_runs_against_the_server(server_url):
    env = {**os.environ, "LLM_ENGINE_BASE_PATH": server_url}
    done = subprocess.run([sys.executable, "-c", readme_example()], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_models_are_served_under_the_names_given(smollm2_folder):
    assert served_models(None) == {MODEL: MODEL}
    assert served_models([f"chat={MODEL}", str(smollm2_folder), f"local={smollm2_folder}"]) == {
        "chat": MODEL,
        smollm2_folder.name: str(smollm2_folder.resolve()),
        "local": str(smollm2_folder.resolve()),
    }
    with pytest.raises(ServerSetupError, match="no-such-model"):
        served_models(["x=no-such-model"])


def test_a_folder_whose_path_holds_an_equals_sign_is_served_under_the_name_given(tmp_path):
    folder = tmp_path / "runs" / "lr=3e-4" / "checkpoint"
    folder.mkdir(parents=True)
    assert served_models([f"mine={folder}"]) == {"mine": str(folder.resolve())}
    assert served_models([str(folder)]) == {"checkpoint": str(folder.resolve())}


def test_a_flood_of_huge_requests_waits_its_turn_and_the_server_keeps_answering(smollm2_folder):
    """12 streams asking 1,000 tokens each of a server sized for 2 sequences: 2 decode, 10 wait
    in line (the KV pool is allocated once, so memory stays bounded), /healthz answers meanwhile,
    and once the flood's clients leave, a normal request is served."""
    from nanoengine import configure
    from nanoengine.api import models

    saved = models._settings
    configure(max_batch_size=2, max_seq_len=1024)
    try:
        with running_server(ServerSettings()) as url:
            route = f"{url}v1/llm/completions-stream?model_endpoint_name={MODEL}"
            body = {"prompt": ENDLESS, "max_new_tokens": 1000, "temperature": 0}
            flood = [requests.post(route, json=body, stream=True, timeout=60) for _ in range(12)]
            engine = models.get_model(MODEL).engine
            assert engine.runner.cache.batch_size == 2
            assert wait_until(lambda: engine.scheduler.running == 2 and len(engine.scheduler.waiting) == 10, 30)
            health = requests.get(f"{url}healthz", timeout=5).json()
            assert health["active_requests"] == 12
            for response in flood:
                response.close()
            assert wait_until(lambda: engine.active_requests == 0, 30), "the flood's requests outlived their clients"
            answer = requests.post(
                f"{url}v1/llm/completions-sync?model_endpoint_name={MODEL}",
                json={"prompt": PROMPT, "max_new_tokens": 3, "temperature": 0}, timeout=60,
            )  # fmt: skip
            assert answer.status_code == 200 and answer.json()["output"]["num_completion_tokens"] == 3
    finally:
        models._settings = saved
