"""`nanoengine serve` against slow, stalled, gone and hostile clients, and browser pages.

Run these alone with `pytest -m hostile`. Every wait is for a condition, with a generous bound:
nothing here depends on how fast a busy machine is.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import requests

import nanoengine
from nanoengine import InvalidParameterError
from nanoengine.server.app import uvicorn_server
from nanoengine.server.common import ServerSettings, ServerSetupError
from conftest import wait_until  # noqa: E402

pytestmark = pytest.mark.hostile

MODEL = nanoengine.DEFAULT_MODEL
PROMPT = "The capital of France is"
ENDLESS = "1, 2, 3, 4, 5, 6, 7, 8,"  # greedy counting runs past 400 tokens, with no end-of-sequence
SYNC = f"v1/llm/completions-sync?model_endpoint_name={MODEL}"
STREAM = f"v1/llm/completions-stream?model_endpoint_name={MODEL}"
HALF_HEADERS = b"POST /" + SYNC.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-ty"
HALF_BODY = (
    b"POST /" + SYNC.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"prom"
)


@contextmanager
def running_server(settings: ServerSettings) -> Iterator[tuple[str, int]]:
    """The server `nanoengine serve` runs, in a thread on a free loopback port: (base URL, port)."""
    server = uvicorn_server(settings, "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    assert wait_until(lambda: server.started or not thread.is_alive(), 60) and server.started, "no server"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/", port
    finally:
        server.should_exit = True
        thread.join(30)



def connect(port: int, sending: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    if sending:
        s.sendall(sending)
    return s


def answer_or_close(s: socket.socket, seconds: float = 60) -> bytes:
    """What the server sends before it closes the connection (b"" for a bare close or a reset).

    (A server that closes a socket whose bytes it has not read yet resets it, and a reset
    discards the answer: a client closed before its half request was read gets no 503.)
    """
    s.settimeout(seconds)
    received = b""
    try:
        while chunk := s.recv(4096):
            received += chunk
    except ConnectionResetError:
        return b""
    return received


def started_stream(port: int) -> socket.socket:
    """A connection whose long streamed answer has begun (its first event has come)."""
    body = json.dumps({"prompt": ENDLESS, "max_new_tokens": 400, "temperature": 0}).encode()
    s = connect(port, b"POST /" + STREAM.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
    received = b""
    while b"data:" not in received:
        chunk = s.recv(4096)
        assert chunk, f"the stream ended before its first event: {received!r}"
        received += chunk
    return s


def completion(url: str, **headers: str) -> requests.Response:
    body = json.dumps({"prompt": PROMPT, "max_new_tokens": 2, "temperature": 0})
    return requests.post(url + SYNC, data=body, headers={"content-type": "application/json", **headers}, timeout=120)


@pytest.fixture(scope="module")
def server(smollm2_folder) -> Iterator[tuple[str, int]]:
    with running_server(ServerSettings(receive_timeout=2.0)) as running:
        yield running


# --- 1. held-open connections ---


class Lines:
    """A process's stderr lines, read in a thread."""

    def __init__(self, stream) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.queue.put(line) for line in stream], daemon=True).start()

    def wait_for(self, pattern: str, seconds: float) -> re.Match:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.drain(0.1)
            if self.seen and (found := re.search(pattern, self.seen[-1])):
                return found
        raise AssertionError(f"no line matched {pattern!r} in {seconds} s; got: {''.join(self.seen)}")

    def drain(self, wait: float = 0.0) -> None:
        try:
            self.seen.append(self.queue.get(timeout=wait) if wait else self.queue.get_nowait())
        except queue.Empty:
            pass


@pytest.mark.parametrize("soft, hard", [(256, 256), (1024, 1024), (64, 64), (1024, resource.RLIM_INFINITY)])
def test_connections_and_accept_batches_in_flight_fit_under_the_open_files_limit(monkeypatch, soft, hard):
    """asyncio accepts a whole batch per loop turn before the cap sees it: the batches must fit too."""
    from nanoengine.server import guard as server_guard
    from nanoengine.server.guard import BATCHES_IN_FLIGHT, LISTEN_BACKLOG, OWN_FILES, connection_limits

    limit = {"now": (soft, hard)}
    monkeypatch.setattr(server_guard.resource, "getrlimit", lambda kind: limit["now"])
    monkeypatch.setattr(server_guard.resource, "setrlimit", lambda kind, value: limit.update(now=value))
    limits = connection_limits(60.0, 1000)
    raised = limit["now"][0]
    assert raised == (OWN_FILES + 1000 + BATCHES_IN_FLIGHT * LISTEN_BACKLOG if hard != soft else soft)
    assert limits.max_connections >= 1 and 1 <= limits.backlog <= LISTEN_BACKLOG
    if raised >= 2 * OWN_FILES:  # a limit below the process's own files cannot be kept by any choice
        assert OWN_FILES + limits.max_connections + BATCHES_IN_FLIGHT * limits.backlog <= raised


def test_hundreds_of_stalled_connections_do_not_lock_out_a_normal_request(smollm2_folder):
    """520 clients send half a request and wait, against a server with 256 open files at most."""

    def few_open_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    command = [sys.executable, "-m", "nanoengine", "serve", "--port", "0"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, preexec_fn=few_open_files)
    stalled: list[socket.socket] = []
    try:
        log = Lines(process.stderr)
        url = log.wait_for(r"running on (http://127\.0\.0\.1:\d+)", seconds=300).group(1) + "/"
        started = len(log.seen)
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        stalled = [connect(port, HALF_HEADERS if i % 2 else HALF_BODY) for i in range(520)]
        response = completion(url)
        assert response.status_code == 200 and response.json()["output"]["num_completion_tokens"] == 2
        log.wait_for(r"sync model=\S+ tokens=2 .* 200", seconds=30)
        while not log.queue.empty():
            log.drain()
        logged = log.seen[started:]
        assert len(logged) < 10, "".join(logged)
        assert not any("Traceback" in line or "Too many open files" in line for line in logged), "".join(logged)
    finally:
        for s in stalled:
            s.close()
        process.terminate()
        process.wait(30)


def test_a_request_that_does_not_arrive_in_time_is_answered_408_and_closed(server):
    url, port = server
    idle = [connect(port) for _ in range(5)]
    half_headers = [connect(port, HALF_HEADERS) for _ in range(5)]
    half_body = [connect(port, HALF_BODY) for _ in range(5)]
    for s in idle + half_headers + half_body:
        assert answer_or_close(s).startswith(b"HTTP/1.1 408 ")
        s.close()
    assert completion(url).status_code == 200


def test_the_receipt_deadline_spares_a_long_streamed_answer(server):
    url, _ = server
    body = {"prompt": ENDLESS, "max_new_tokens": 48, "temperature": 0}
    with requests.post(url + STREAM, json=body, stream=True, timeout=120) as response:
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith(b"data:")]
    assert events[-1]["output"]["finished"] and events[-1]["output"]["num_completion_tokens"] == 48


def test_at_the_cap_a_stalled_connection_makes_room_and_busy_ones_refuse_with_one_log_line(smollm2_folder, caplog):
    caplog.set_level(logging.INFO, logger="nanoengine")
    with running_server(ServerSettings(max_connections=3, receive_timeout=600)) as (url, port):
        stalled = [connect(port, HALF_HEADERS) for _ in range(3)]
        assert completion(url).status_code == 200  # the longest-waiting stalled one was closed for it
        closed = answer_or_close(stalled[0])  # times out unless the server closed it
        assert closed == b"" or closed.startswith(b"HTTP/1.1 503 ")
        streams = [started_stream(port) for _ in range(3)]  # all three being answered: none to close
        try:
            refused = [answer_or_close(connect(port)) for _ in range(20)]
            assert all(answer.startswith(b"HTTP/1.1 503 ") for answer in refused)
        finally:
            for stream in streams:
                stream.close()
        for s in stalled:
            s.close()
    refusals = [r for r in caplog.records if "refused connections" in r.getMessage()]
    assert 1 <= len(refusals) <= 2  # the first at once, the rest counted in one line per interval
    assert not any(r.exc_info for r in caplog.records)


def test_malformed_requests_are_answered_400_and_logged_once_per_interval(smollm2_folder, caplog):
    caplog.set_level(logging.INFO)
    bad_header = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon in this header line\r\n\r\n"
    with running_server(ServerSettings()) as (url, port):
        for garbage in [b"NOT HTTP AT ALL\r\n\r\n", bad_header] * 15:
            assert answer_or_close(connect(port, garbage)).startswith(b"HTTP/1.1 400 ")
        assert completion(url).status_code == 200
    reports = [r for r in caplog.records if "malformed" in r.getMessage() or "Invalid HTTP" in r.getMessage()]
    assert 1 <= len(reports) <= 2, [r.getMessage() for r in reports]


# --- 3. browser pages ---


def test_post_bodies_must_be_declared_json(server):
    url, _ = server
    body = json.dumps({"prompt": PROMPT, "max_new_tokens": 1})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": content_type} if content_type else {}
        refused = requests.post(url + SYNC, data=body, headers=headers, timeout=30)
        assert refused.status_code == 415 and "application/json" in refused.json()["detail"]
    assert completion(url, **{"content-type": "application/json; charset=utf-8"}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:5005", "192.168.1.10", "localhost.evil.example"])
def test_a_loopback_server_refuses_other_host_names(server, host):
    url, _ = server
    refused = completion(url, Host=host)
    assert refused.status_code == 403 and "--allow-host" in refused.json()["detail"]
    assert requests.get(url + "v1/llm/model-endpoints", headers={"Host": host}, timeout=30).status_code == 403


@pytest.mark.parametrize("host", ["localhost", "localhost:5005", "127.0.0.1:80", "[::1]:5005", "app.localhost"])
def test_a_loopback_server_answers_loopback_names(server, host):
    url, _ = server
    assert completion(url, Host=host).status_code == 200


def test_other_host_names_can_be_allowed(smollm2_folder):
    with running_server(ServerSettings(allowed_hosts=("box.lan",))) as (url, _):
        assert completion(url, Host="box.lan:5005").status_code == 200
        assert completion(url, Host="other.lan").status_code == 403
    with running_server(ServerSettings(allowed_hosts=("*",))) as (url, _):
        assert completion(url, Host="other.lan").status_code == 200


# --- 4. keys ---


def test_an_empty_api_key_is_refused():
    for key in ("", "  "):
        with pytest.raises(ServerSetupError, match="empty"):
            ServerSettings(api_key=key)


def test_the_schema_needs_the_key_once_one_is_set(smollm2_folder):
    with running_server(ServerSettings(api_key="s3cret")) as (url, _):
        assert requests.get(url + "openapi.json", timeout=30).status_code == 401
        schema = requests.get(url + "openapi.json", headers={"x-api-key": "s3cret"}, timeout=30)
        assert schema.status_code == 200 and "/v1/llm/completions-sync" in schema.json()["paths"]
        for page in ("docs", "redoc"):
            assert requests.get(url + page, timeout=30).status_code in (401, 404)
    with running_server(ServerSettings()) as (url, _):
        assert requests.get(url + "openapi.json", timeout=30).status_code == 200


# --- 5. a client gone while sending ---


def test_a_client_that_drops_while_sending_its_body_is_one_info_line(smollm2_folder, caplog):
    caplog.set_level(logging.INFO, logger="nanoengine")
    with running_server(ServerSettings(receive_timeout=600)) as (url, port):
        s = connect(port, HALF_BODY)
        assert wait_until(lambda: requests.get(url + "healthz", timeout=30).json()["active_requests"] == 1, 60)
        s.close()  # the route is reading the body now
        assert wait_until(lambda: requests.get(url + "healthz", timeout=30).json()["active_requests"] == 0, 60)
        assert completion(url).status_code == 200
    mine = [r for r in caplog.records if r.name.startswith(("nanoengine", "uvicorn"))]
    assert len([r for r in mine if "disconnected" in r.getMessage() and r.levelno == logging.INFO]) == 1
    assert [r.getMessage() for r in mine if r.levelno >= logging.WARNING] == []
    assert not any(r.exc_info for r in mine)


# --- 9. a prompt that is not valid Unicode ---


def test_a_lone_surrogate_in_the_prompt_is_a_400_naming_prompt(server):
    url, _ = server
    body = '{"prompt": "a\\ud800b", "max_new_tokens": 2}'  # valid JSON, invalid Unicode
    refused = requests.post(url + SYNC, data=body, headers={"content-type": "application/json"}, timeout=60)
    assert refused.status_code == 400 and "prompt" in refused.json()["detail"]
    with pytest.raises(InvalidParameterError, match="prompt"):
        nanoengine.Completion.create(MODEL, "a\ud800b", max_new_tokens=2)
