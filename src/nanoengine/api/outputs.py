"""The request side of the output: token ids in, stream chunks out, handed to the reader.

`OutputBuilder` turns one request's tokens into `CompletionStreamOutput` chunks as the contract
says: whole UTF-8 characters only (the incremental detokenizer), nothing that may still become a
stop string (`StopChecker`), cumulative counts, `finished` on the last chunk only.

`Mailbox` is where the engine's loop leaves those chunks for the request's reader (a thread
iterating a stream, an asyncio task, the server). Leaving one never blocks the loop; while a
reader lags, text-only chunks are merged into one, so what waits stays small.

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
from collections import deque
from dataclasses import replace

from ..errors import RequestTimeoutError
from .stopping import StopChecker
from ..model.tokenizer import IncrementalDetokenizer, Tokenizer
from .types import CompletionStreamOutput, TokenOutput
from .validation import CompletionRequest


class OutputBuilder:
    """One request's token ids in, its stream chunks out."""

    def __init__(self, request: CompletionRequest, tokenizer: Tokenizer, eos_ids: frozenset[int], num_prompt_tokens: int) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.num_prompt_tokens = num_prompt_tokens
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.skip_special_tokens)
        self.stops = StopChecker(request.stop_sequences, request.include_stop_str_in_output)
        self.count = 0
        self.finished = False

    def add(
        self, token_id: int, logprob: float, alternatives: list[tuple[int, float]] | None = None
    ) -> CompletionStreamOutput:
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
    unless the request asked (`CompletionRequest.top_logprobs`)."""
    return getattr(token, "top_logprobs", None)


def token_id_of(token: TokenOutput) -> int | None:
    """The chosen token's id, noted whenever its log-prob is (its text alone may be part of a character)."""
    return getattr(token, "token_id", None)


class ReaderGone(Exception):
    """The reader's event loop is closed: nobody will read this request's chunks."""


Item = CompletionStreamOutput | BaseException


class Mailbox:
    """Chunks (or the error that ended the request) from the engine's loop to one reader."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._items: deque[Item] = deque()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None

    def put(self, item: Item) -> None:
        """Leave an item, merging text-only chunks while the reader lags; never blocks for long.

        Raises `ReaderGone` when the reader's event loop has closed.
        """
        with self._lock:
            if self._items and _mergeable(self._items[-1], item):
                self._items[-1] = _merged(self._items[-1], item)
            else:
                self._items.append(item)
            self._ready.notify()
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, future = waiter
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError:  # the loop is closed
                raise ReaderGone() from None

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


def _mergeable(old: Item, new: Item) -> bool:
    """Text-only chunks merge; a chunk carrying a token's log-prob, or an error, stays whole."""
    return (
        isinstance(old, CompletionStreamOutput)
        and isinstance(new, CompletionStreamOutput)
        and old.token is None
        and new.token is None
    )


def _merged(old: CompletionStreamOutput, new: CompletionStreamOutput) -> CompletionStreamOutput:
    merged = replace(new, text=old.text + new.text)
    if finish_reason_of(new) is not None:
        merged.finish_reason = finish_reason_of(new)
    return merged


def timeout_error(request: CompletionRequest, done: int, doing: str) -> RequestTimeoutError:
    return RequestTimeoutError(
        f"the request ran past its timeout of {request.timeout:g} s while {doing} "
        f"({done} of {request.max_new_tokens} tokens generated)"
    )
