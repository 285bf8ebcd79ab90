"""`Completion`: nanoengine's public face, shaped after `llmengine.Completion`.

One token's path: `Completion.create` checks every parameter (`params.py`); `submit` gets
the loaded model (`models.py`), tokenizes the prompt with the checkpoint's own tokenizer and
hands the request to the model's engine (`engine.py`). The engine's loop runs the request's
tokens in batches with every other request's, picks each with the request's own sampler
(`sampling.py`), turns it into a chunk (`outputs.OutputBuilder`: whole characters, stop strings
held back) and leaves the chunk in the request's mailbox. A stream hands the chunks out as they
come; a full response is the same chunks joined. `acreate` reads the same mailbox from asyncio.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from ..engine.loop import Handle
from .models import LoadedModel, get_model
from .outputs import timeout_error
from ..params import CompletionParams, signature_of
from .types import (
    CompletionOutput,
    CompletionStreamOutput,
    CompletionStreamV1Response,
    CompletionSyncV1Response,
)


class Completion:
    """Text completion with a local model, called as `llmengine.Completion` is.

    `create` returns a `CompletionSyncV1Response`, or with `stream=True` an iterator of
    `CompletionStreamV1Response` chunks; `acreate` is the same for asyncio. Many threads and
    tasks may call at once: requests to one model are batched by its engine.
    """

    @staticmethod
    @signature_of(CompletionParams)
    def create(*args: Any, **kwargs: Any) -> CompletionSyncV1Response | Iterator[CompletionStreamV1Response]:
        """Complete `prompt` with the model `model_name` (a registered name or a checkpoint folder).

        Takes `CompletionParams`' fields (llmengine's parameters, in its order). `temperature=0`
        is greedy. Generation ends at the earliest of `stop_sequences` (cut from the text unless
        `include_stop_str_in_output`), at an end-of-sequence token, or after `max_new_tokens`.
        `timeout` seconds bound the whole request, waiting for the model to be free included
        (loading it, once per process, is not counted). Every parameter is checked before any
        work; errors derive from `ValueError`, and running out of time raises a `TimeoutError`
        (in a stream: after the chunks so far). A stream that is closed, dropped or left stops at
        the next decode step.
        """
        request = CompletionParams(*args, **kwargs)
        chunks = CompletionStream(str(uuid.uuid4()), *submit(request))
        if request.stream:
            return chunks
        with chunks:
            return CompletionSyncV1Response(chunks.request_id, collect(request, (r.output for r in chunks)))

    @staticmethod
    @signature_of(CompletionParams)
    async def acreate(*args: Any, **kwargs: Any) -> CompletionSyncV1Response | AsyncCompletionStream:
        """`create` for asyncio: awaited to a response, or with `stream=True` to an async iterable.

        Loading and tokenizing run in an executor thread and the forward passes in the engine's,
        so the event loop never blocks; a cancelled task stops its generation at the next step.
        """
        request = CompletionParams(*args, **kwargs)
        loaded, prompt_ids = await asyncio.get_running_loop().run_in_executor(None, prepare, request)
        chunks = AsyncCompletionStream(str(uuid.uuid4()), *submit(request, loaded, prompt_ids))
        if request.stream:
            return chunks
        try:
            outputs = [response.output async for response in chunks]
        finally:
            await chunks.aclose()
        return CompletionSyncV1Response(chunks.request_id, collect(request, outputs))


def prepare(request: CompletionParams) -> tuple[LoadedModel, list[int]]:
    """Get the model (loading it on first use) and tokenize the prompt; check it fits."""
    loaded = get_model(request.model_name)
    prompt_ids = loaded.tokenizer.encode(request.prompt)  # exactly as tokenizer.json says
    loaded.engine.check_length(len(prompt_ids), request.max_new_tokens)
    return loaded, prompt_ids


def submit(
    request: CompletionParams, loaded: LoadedModel | None = None, prompt_ids: list[int] | None = None
) -> tuple[Handle | None, CompletionParams, float]:
    """Hand the request to its model's engine; return the handle (None for zero new tokens),
    the request and its deadline.

    The clock of `timeout` starts once the model is loaded: loading (or fetching) happens once
    per process, and a first request should not fail for it. Waiting for a free slot does count.
    """
    if loaded is None or prompt_ids is None:
        loaded, prompt_ids = prepare(request)
    deadline = time.monotonic() + request.timeout
    if request.max_new_tokens == 0:
        return _Empty(len(prompt_ids)), request, deadline
    return loaded.engine.submit(request, prompt_ids, deadline), request, deadline


class _Empty:
    """What a request for zero new tokens reads: one empty, finished chunk, without the engine."""

    def __init__(self, num_prompt_tokens: int) -> None:
        self.chunk = CompletionStreamOutput("", True, num_prompt_tokens, 0)

    def abort(self) -> None:
        pass


class _Chunks:
    """The reading side shared by the sync and async streams: items, errors, timeout, abort."""

    def __init__(self, request_id: str, handle: Handle | _Empty, request: CompletionParams, deadline: float) -> None:
        self.request_id = request_id
        self._handle, self._request, self._deadline = handle, request, deadline
        self._done = False
        self._count = 0
        weakref.finalize(self, handle.abort)  # a stream dropped unread stops its request

    def _wrap(self, item: CompletionStreamOutput | BaseException) -> CompletionStreamV1Response:
        if isinstance(item, BaseException):
            raise item
        self._count = item.num_completion_tokens or 0
        self._done = item.finished
        return CompletionStreamV1Response(request_id=self.request_id, output=item)

    def _timed_out(self) -> Exception:
        return timeout_error(self._request, self._count, "generating")

    def _stop(self) -> None:
        self._done = True
        self._handle.abort()


class CompletionStream(_Chunks):
    """What `Completion.create(..., stream=True)` gives: `for chunk in stream` (or `next(stream)`).

    Breaking out of the loop, `close()`, or dropping the stream stops the generation at the next
    step of the engine.
    """

    def __iter__(self) -> Iterator[CompletionStreamV1Response]:
        """A fresh generator over the chunks: a `for` loop that breaks drops it, and dropping it
        stops the request (the engine would otherwise run ahead for a reader who left)."""
        try:
            while not self._done:
                yield next(self)
        finally:
            self._stop()

    def __next__(self) -> CompletionStreamV1Response:
        if self._done:
            raise StopIteration
        try:
            if isinstance(self._handle, _Empty):
                return self._wrap(self._handle.chunk)
            try:
                item = self._handle.mailbox.get(self._deadline)
            except TimeoutError:
                raise self._timed_out() from None
            return self._wrap(item)
        except BaseException:
            self._stop()
            raise

    def close(self) -> None:
        self._stop()

    def __enter__(self) -> CompletionStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def collect(request: CompletionParams, chunks: Iterable[CompletionStreamOutput]) -> CompletionOutput:
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


class AsyncCompletionStream(_Chunks):
    """What `await Completion.acreate(..., stream=True)` gives: `async for chunk in stream`.

    Dropping it, `aclose()`, or cancelling the task that reads it stops the generation at the
    next step of the engine.
    """

    def __aiter__(self) -> AsyncIterator[CompletionStreamV1Response]:
        """A fresh async generator over the chunks, which stops the request once an `async for`
        that breaks drops it."""
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[CompletionStreamV1Response]:
        try:
            while not self._done:
                yield await self.__anext__()
        finally:
            self._stop()

    async def __anext__(self) -> CompletionStreamV1Response:
        if self._done:
            raise StopAsyncIteration
        try:
            if isinstance(self._handle, _Empty):
                return self._wrap(self._handle.chunk)
            try:
                item = await self._handle.mailbox.aget(self._deadline)
            except TimeoutError:
                raise self._timed_out() from None
            return self._wrap(item)
        except BaseException:  # an error, a timeout, or the reading task cancelled
            self._stop()
            raise

    async def aclose(self) -> None:
        self._stop()
