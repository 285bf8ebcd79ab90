"""The request side of a completion's output: the engine's token ids in, llmengine's chunks out.

The engine's loop leaves each request's sampled tokens in the request's `Mailbox` and goes on;
the reader (a thread iterating a stream, an asyncio task, the server) takes whatever has arrived
and turns it into chunks with the request's `OutputBuilder`: whole UTF-8 characters only (the
incremental detokenizer), nothing that may still become a stop string (`StopChecker`),
cumulative counts, `finished` on the last chunk only. So detokenizing and stop strings run on
the reader's thread, never the engine's; a stop string completed here aborts the request in the
engine, which may have run a step or two further meanwhile (as vLLM's engine core does).

Beyond llmengine's fields, the builder notes two things for the OpenAI routes, as plain attributes
rather than dataclass fields, so that `dict()`/`json()` (which read fields only) still give exactly
llmengine's JSON: on the last chunk, why the sequence ended (`finish_reason_of`), and on a token,
its id (`token_id_of`) and, when the request asked, its likeliest alternatives (`top_logprobs_of`).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import replace

from ..engine.loop import Handle, Tokens
from ..errors import RequestTimeoutError
from ..model.tokenizer import IncrementalDetokenizer, Tokenizer
from ..params import CompletionParams
from .stopping import StopChecker
from .types import CompletionOutput, CompletionStreamOutput, CompletionStreamV1Response, TokenOutput


class OutputBuilder:
    """One request's token ids in, its stream chunks out."""

    def __init__(self, request: CompletionParams, tokenizer: Tokenizer, eos_ids: frozenset[int], num_prompt_tokens: int) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.num_prompt_tokens = num_prompt_tokens
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.skip_special_tokens)
        self.stops = StopChecker(request.stop_sequences, request.include_stop_str_in_output)
        self.count = 0
        self.finished = False

    def add(self, tokens: Tokens) -> list[CompletionStreamOutput]:
        """The chunks for tokens that arrived together: one per token when each carries its
        log-probability, else one with their text joined. Tokens after the end are dropped."""
        chunks = []
        alternatives = tokens.alternatives or [None] * len(tokens.ids)
        for token_id, logprob, top in zip(tokens.ids, tokens.logprobs, alternatives):
            if self.finished:
                break
            chunks.append(self._chunk(token_id, logprob, top))
        if self.request.return_token_log_probs or len(chunks) <= 1:
            return chunks
        merged = replace(chunks[-1], text="".join(c.text for c in chunks))
        if finish_reason_of(chunks[-1]) is not None:
            merged.finish_reason = finish_reason_of(chunks[-1])
        return [merged]

    def _chunk(self, token_id: int, logprob: float, alternatives: list[tuple[int, float]] | None) -> CompletionStreamOutput:
        """The chunk for the next token; it is the last (`finished`) at an end-of-sequence token,
        at `max_new_tokens`, or when a stop string completes. `alternatives` are the likeliest
        (token id, log-prob) pairs at this step, when the request asked for them."""
        self.count += 1
        ended = token_id in self.eos_ids
        last = ended or self.count == self.request.max_new_tokens
        text = self._text(token_id, last)
        self.finished = last or self.stops.stopped
        token = None
        if self.request.return_token_log_probs:
            token = TokenOutput(token=self.tokenizer.decode([token_id], skip_special_tokens=False), log_prob=logprob)
            token.token_id = token_id
            if alternatives is not None:
                token.top_logprobs = alternatives
        chunk = CompletionStreamOutput(
            text=text,
            finished=self.finished,
            num_prompt_tokens=self.num_prompt_tokens if self.finished else None,
            num_completion_tokens=self.count,
            token=token,
        )
        if self.finished:
            chunk.finish_reason = "stop" if ended or self.stops.stopped else "length"
        return chunk

    def _text(self, token_id: int, last: bool) -> str:
        # As in vLLM, the end-of-sequence token's own text is output only on request.
        skip = token_id in self.eos_ids and not self.request.include_stop_str_in_output
        piece = "" if skip else self.detokenizer.add(token_id)
        if last:
            piece += self.detokenizer.flush()  # held back for a character that can no longer complete
        text = self.stops.feed(piece)
        if last or self.stops.stopped:
            text += self.stops.flush()  # held back for a stop string that can no longer complete
        return text


def finish_reason_of(chunk: CompletionStreamOutput) -> str | None:
    """Why a stream's last chunk ended it: "stop" (an end-of-sequence token or a stop string) or
    "length" (`max_new_tokens`); None on the other chunks."""
    return getattr(chunk, "finish_reason", None)


def top_logprobs_of(token: TokenOutput) -> list[tuple[int, float]] | None:
    """The likeliest (token id, log-prob) pairs where `token` was chosen, likeliest first; None
    unless the request asked (`submit(..., top_logprobs=N)`)."""
    return getattr(token, "top_logprobs", None)


def token_id_of(token: TokenOutput) -> int | None:
    """The chosen token's id, noted whenever its log-prob is (its text alone may be part of a character)."""
    return getattr(token, "token_id", None)


Item = Tokens | BaseException


class Mailbox:
    """Tokens (or the error that ended the request) from the engine's loop to one reader.

    Leaving an item never blocks the loop; while the reader lags, tokens gather into one item,
    so what waits stays small.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._items: deque[Item] = deque()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None

    def put(self, item: Item) -> bool:
        """Leave an item; False when the reader's event loop has closed (nobody will read it)."""
        with self._lock:
            if self._items and isinstance(self._items[-1], Tokens) and isinstance(item, Tokens):
                self._items[-1] = self._items[-1].then(item)
            else:
                self._items.append(item)
            self._ready.notify()
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, future = waiter
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError:  # the loop is closed
                return False
        return True

    def get(self, deadline: float) -> Item:
        """The next item, waiting at most until `deadline` (time.monotonic()); raises TimeoutError."""
        with self._lock:
            if not self._ready.wait_for(lambda: self._items, timeout=max(deadline - time.monotonic(), 0.0)):
                raise TimeoutError
            return self._items.popleft()

    async def aget(self, deadline: float) -> Item:
        """`get` for asyncio: the event loop is free while waiting; cancellation propagates."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._items:
                    return self._items.popleft()
                future = loop.create_future()
                self._waiter = (loop, future)
            left = deadline - time.monotonic()
            # asyncio.wait, not wait_for: on Python 3.11 wait_for can swallow a cancellation.
            done, _ = await asyncio.wait({future}, timeout=max(left, 0.0) if left < math.inf else None)
            if not done:
                with self._lock:
                    self._waiter = None
                    if not self._items:
                        raise TimeoutError


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class NoTokens:
    """What a request for zero new tokens reads: one empty, finished chunk, without the engine."""

    def __init__(self, num_prompt_tokens: int) -> None:
        self.chunk = CompletionStreamOutput("", True, num_prompt_tokens, 0)

    def abort(self) -> None:
        pass


class _Chunks:
    """The reading side shared by the sync and async streams: tokens to chunks, errors, timeout, abort."""

    def __init__(
        self, request_id: str, handle: Handle | NoTokens, request: CompletionParams, deadline: float, builder: OutputBuilder | None
    ) -> None:
        self.request_id = request_id
        self._handle, self._request, self._deadline, self._builder = handle, request, deadline, builder
        self._ready: deque[CompletionStreamOutput] = deque([handle.chunk] if isinstance(handle, NoTokens) else [])
        self._done = False
        weakref.finalize(self, handle.abort)  # a stream dropped unread stops its request

    def _chunks_of(self, item: Item) -> None:
        """Turn what the engine left into chunks; a stop string found in them ends the request."""
        if isinstance(item, BaseException):
            raise item
        self._ready.extend(self._builder.add(item))
        if self._builder.finished:
            self._handle.abort()  # the engine may not know yet (a stop string); nothing if it has ended

    def _output(self) -> CompletionStreamOutput:
        chunk = self._ready.popleft()
        self._done = chunk.finished
        return chunk

    def _timed_out(self) -> Exception:
        done = self._builder.count if self._builder is not None else 0
        return RequestTimeoutError.ran_out(self._request.timeout, done, self._request.max_new_tokens, "generating")

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

    def outputs(self) -> Iterator[CompletionStreamOutput]:
        """The chunks themselves, without llmengine's response around each (for `llm.generate`)."""
        try:
            while not self._done:
                yield self.next_output()
        finally:
            self._stop()

    def __next__(self) -> CompletionStreamV1Response:
        return CompletionStreamV1Response(request_id=self.request_id, output=self.next_output())

    def next_output(self) -> CompletionStreamOutput:
        if self._done:
            raise StopIteration
        try:
            while not self._ready:
                try:
                    item = self._handle.mailbox.get(self._deadline)
                except TimeoutError:
                    raise self._timed_out() from None
                self._chunks_of(item)
            return self._output()
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
            while not self._ready:
                try:
                    item = await self._handle.mailbox.aget(self._deadline)
                except TimeoutError:
                    raise self._timed_out() from None
                self._chunks_of(item)
            return CompletionStreamV1Response(request_id=self.request_id, output=self._output())
        except BaseException:  # an error, a timeout, or the reading task cancelled
            self._stop()
            raise

    async def aclose(self) -> None:
        self._stop()
