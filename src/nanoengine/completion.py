"""`Completion`: nanoengine's public face, shaped after `llmengine.Completion`.

One token's path: `Completion.create` checks every parameter (`validation.py`); `prepare` gets
the loaded model (`engine.py`) and tokenizes the prompt with the checkpoint's own tokenizer;
`stream_chunks` pulls tokens one at a time from `generate` (`generation.py`, which picks each
with the `Sampler` of `sampling.py`), each step under the model's lock and within the deadline;
the incremental detokenizer turns the token into text, the `StopChecker` (`stopping.py`) holds
back what may become a stop string, and the result is one `CompletionStreamOutput` chunk. A
stream hands the chunks out as they come; a full response is the same chunks joined. `acreate`
runs that very loop in a worker thread (`background.py`).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from typing import Any

from .background import END, READY, Worker
from .engine import LoadedModel, get_model
from .errors import RequestTimeoutError
from .generation import GeneratedToken, check_lengths, generate
from .stopping import StopChecker
from .tokenizer import IncrementalDetokenizer
from .types import (
    CompletionOutput,
    CompletionStreamOutput,
    CompletionStreamV1Response,
    CompletionSyncV1Response,
    TokenOutput,
)
from .validation import CompletionRequest, validate_request


class Completion:
    """Text completion with a local model, called as `llmengine.Completion` is.

    `create` returns a `CompletionSyncV1Response`, or with `stream=True` an iterator of
    `CompletionStreamV1Response` chunks; `acreate` is the same for asyncio. Requests to one
    model take their decode steps in turn, so many threads and tasks may call at once.
    """

    @classmethod
    def create(
        cls,
        model_name: str | os.PathLike | None = None,
        prompt: str | None = None,
        max_new_tokens: int = 20,
        temperature: float = 0.2,
        timeout: float = 10,
        stream: bool = False,
        *,
        stop_sequences: list[str] | None = None,
        return_token_log_probs: bool | None = False,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        include_stop_str_in_output: bool | None = None,
        skip_special_tokens: bool | None = True,
        seed: int | None = None,
        model: str | os.PathLike | None = None,
    ) -> CompletionSyncV1Response | Iterator[CompletionStreamV1Response]:
        """Complete `prompt` with the model `model_name` (a registered name or a checkpoint folder).

        `temperature=0` is greedy. Generation ends at the earliest of `stop_sequences` (cut from
        the text unless `include_stop_str_in_output`), at an end-of-sequence token, or after
        `max_new_tokens`. `timeout` seconds bound the whole request, waiting for the model to be
        free included (loading it, once per process, is not counted). Every parameter is checked
        before any work; errors derive from `ValueError`, and running out of time raises a
        `TimeoutError` (in a stream: after the chunks so far). A stream that is closed, dropped
        or left stops at the next decode step.
        """
        request = validate_request(**_params(locals()))
        job = prepare(request)
        request_id = str(uuid.uuid4())
        if stream:
            return _responses(request_id, stream_chunks(job))
        return CompletionSyncV1Response(request_id, collect(request, stream_chunks(job)))

    @classmethod
    async def acreate(
        cls,
        model_name: str | os.PathLike | None = None,
        prompt: str | None = None,
        max_new_tokens: int = 20,
        temperature: float = 0.2,
        timeout: float = 10,
        stream: bool = False,
        *,
        stop_sequences: list[str] | None = None,
        return_token_log_probs: bool | None = False,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        include_stop_str_in_output: bool | None = None,
        skip_special_tokens: bool | None = True,
        seed: int | None = None,
        model: str | os.PathLike | None = None,
    ) -> CompletionSyncV1Response | AsyncCompletionStream:
        """`create` for asyncio: awaited to a response, or with `stream=True` to an async iterable.

        Loading, tokenizing and every forward pass run in a worker thread, so the event loop
        never blocks; a cancelled task stops its generation at the next decode step.
        """
        request = validate_request(**_params(locals()))
        worker = Worker(partial(_start, request), request.timeout)
        chunks = AsyncCompletionStream(str(uuid.uuid4()), worker)
        await chunks.ready()
        if stream:
            return chunks
        try:
            outputs = [response.output async for response in chunks]
        finally:
            await chunks.aclose()
        return CompletionSyncV1Response(chunks.request_id, collect(request, outputs))


def _params(local_vars: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in local_vars.items() if name != "cls"}


@dataclass(frozen=True)
class Job:
    """A valid request bound to its loaded model and tokenized prompt."""

    request: CompletionRequest
    model: LoadedModel
    prompt_ids: list[int]
    deadline: float  # time.monotonic() when the request runs out of time


def prepare(request: CompletionRequest) -> Job:
    """Get the model (loading it on first use) and tokenize the prompt; check it fits the context.

    The clock of `timeout` starts once the model is loaded: loading (or fetching) happens once
    per process, and a first request should not fail for it. Waiting for the model to be free
    does count.
    """
    loaded = get_model(request.model_name)
    deadline = time.monotonic() + request.timeout
    prompt_ids = loaded.tokenizer.encode(request.prompt)  # exactly as tokenizer.json says
    check_lengths(loaded.model, len(prompt_ids), request.max_new_tokens)
    return Job(request, loaded, prompt_ids, deadline)


def _start(request: CompletionRequest, cancel: threading.Event) -> tuple[Iterator[CompletionStreamOutput], float]:
    """What `acreate`'s worker thread runs: prepare the request, then its chunks."""
    job = prepare(request)
    return stream_chunks(job, cancel), job.deadline


def stream_chunks(job: Job, cancel: threading.Event | None = None) -> Iterator[CompletionStreamOutput]:
    """Generate, one chunk per token; the last chunk has `finished=True` and `num_prompt_tokens`.

    Nothing runs between two `next()` calls, so closing this generator (or setting `cancel`)
    ends the generation at a step boundary.
    """
    request, loaded = job.request, job.model
    eos_ids = frozenset(loaded.model.config.eos_token_ids)
    tokens = generate(loaded.model, job.prompt_ids, request.max_new_tokens, request.sampling, eos_ids)
    text = _CompletionText(job, eos_ids)
    with closing(tokens):
        if request.max_new_tokens == 0:
            yield CompletionStreamOutput("", True, len(job.prompt_ids), 0)
            return
        for count in range(1, request.max_new_tokens + 1):
            token = _next_token(tokens, job, cancel, count - 1)
            if token is None:
                return
            last = token.id in eos_ids or count == request.max_new_tokens  # as `generate` stops
            delta = text.add(token.id, last)
            finished = last or text.stopped
            yield CompletionStreamOutput(
                text=delta,
                finished=finished,
                num_prompt_tokens=len(job.prompt_ids) if finished else None,
                num_completion_tokens=count,
                token=_token_output(loaded, token) if request.return_token_log_probs else None,
            )
            if finished:
                return


class _CompletionText:
    """Token ids in, the text a stream may emit out: whole characters only, and nothing that
    may still turn into a stop string."""

    def __init__(self, job: Job, eos_ids: frozenset[int]) -> None:
        self.eos_ids = eos_ids
        self.include_stop = job.request.include_stop_str_in_output
        self.detokenizer = IncrementalDetokenizer(job.model.tokenizer, job.request.skip_special_tokens)
        self.stops = StopChecker(job.request.stop_sequences, self.include_stop)

    @property
    def stopped(self) -> bool:
        return self.stops.stopped

    def add(self, token_id: int, last: bool) -> str:
        """The new text that `token_id` releases; `last`: no token will follow it."""
        # As in vLLM, the end-of-sequence token's own text is output only on request.
        skip = token_id in self.eos_ids and not self.include_stop
        piece = "" if skip else self.detokenizer.add(token_id)
        if last:
            piece += self.detokenizer.flush()  # held back for a character that can no longer complete
        text = self.stops.feed(piece)
        if last or self.stopped:
            text += self.stops.flush()  # held back for a stop string that can no longer complete
        return text


def _next_token(
    tokens: Iterator[GeneratedToken], job: Job, cancel: threading.Event | None, done: int
) -> GeneratedToken | None:
    """Run one step of `tokens` under the model's lock, within the deadline; None if cancelled."""
    lock, deadline = job.model.lock, job.deadline
    if not lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
        raise _timeout_error(job, done, "waiting for the model")
    try:
        if cancel is not None and cancel.is_set():
            return None
        if time.monotonic() >= deadline:
            raise _timeout_error(job, done, "generating")
        return next(tokens)
    finally:
        lock.release()


def _timeout_error(job: Job, done: int, doing: str) -> RequestTimeoutError:
    return RequestTimeoutError(
        f"the request ran past its timeout of {job.request.timeout:g} s while {doing} "
        f"({done} of {job.request.max_new_tokens} tokens generated)"
    )


def _token_output(loaded: LoadedModel, token: GeneratedToken) -> TokenOutput:
    return TokenOutput(token=loaded.tokenizer.decode([token.id], skip_special_tokens=False), log_prob=token.logprob)


def collect(request: CompletionRequest, chunks: Iterable[CompletionStreamOutput]) -> CompletionOutput:
    """The full response that a stream's chunks add up to."""
    texts, tokens, last = [], [], None
    for last in chunks:
        texts.append(last.text)
        if last.token is not None:
            tokens.append(last.token)
    assert last is not None and last.finished, "a stream that ran to its end has a finished chunk"
    return CompletionOutput(
        text="".join(texts),
        num_prompt_tokens=last.num_prompt_tokens,
        num_completion_tokens=last.num_completion_tokens or 0,
        tokens=tokens if request.return_token_log_probs else None,
    )


def _responses(request_id: str, chunks: Iterator[CompletionStreamOutput]) -> Iterator[CompletionStreamV1Response]:
    with closing(chunks):
        for chunk in chunks:
            yield CompletionStreamV1Response(request_id=request_id, output=chunk)


class AsyncCompletionStream:
    """What `await Completion.acreate(..., stream=True)` gives: `async for chunk in stream`.

    Dropping it, `aclose()`, or cancelling the task that reads it stops the generation at the
    next decode step.
    """

    def __init__(self, request_id: str, worker: Worker) -> None:
        self.request_id = request_id
        self._worker = worker
        self._done = False
        weakref.finalize(self, worker.cancel)

    async def ready(self) -> None:
        """Wait until the model is loaded and the prompt tokenized; raise what went wrong there."""
        await self._get(expect_ready=True)

    def __aiter__(self) -> AsyncIterator[CompletionStreamV1Response]:
        return self

    async def __anext__(self) -> CompletionStreamV1Response:
        if self._done:
            raise StopAsyncIteration
        chunk = await self._get()
        if chunk is END:
            self._done = True
            raise StopAsyncIteration
        return CompletionStreamV1Response(request_id=self.request_id, output=chunk)

    async def aclose(self) -> None:
        self._done = True
        self._worker.cancel()

    async def _get(self, expect_ready: bool = False) -> Any:
        try:
            item = await self._worker.get()
        except BaseException:  # an error, a timeout, or the reading task cancelled
            await self.aclose()
            raise
        assert (item is READY) == expect_ready
        return item
