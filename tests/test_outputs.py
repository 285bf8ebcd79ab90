"""Chunks from the engine to a reader: merged while the reader lags, errors kept, closed loops noticed."""

from __future__ import annotations

import asyncio
import time

import pytest

from nanoengine.api.outputs import Mailbox, ReaderGone
from nanoengine.api.types import CompletionStreamOutput, TokenOutput


def chunk(text: str, count: int, finished: bool = False, token: TokenOutput | None = None) -> CompletionStreamOutput:
    return CompletionStreamOutput(text, finished, 5 if finished else None, count, token)


def test_a_lagging_reader_gets_the_text_merged_into_one_chunk():
    box = Mailbox()
    for i, word in enumerate(["The", " capital", " is"], 1):
        box.put(chunk(word, i))
    box.put(chunk(" Paris", 4, finished=True))
    merged = box.get(time.monotonic() + 1)
    assert merged == chunk("The capital is Paris", 4, finished=True)


def test_chunks_with_log_probs_and_errors_stay_whole():
    box = Mailbox()
    box.put(chunk("a", 1, token=TokenOutput("a", -0.1)))
    box.put(chunk("b", 2, token=TokenOutput("b", -0.2)))
    error = TimeoutError("late")
    box.put(error)
    got = [box.get(time.monotonic() + 1) for _ in range(3)]
    assert [g.text for g in got[:2]] == ["a", "b"] and got[2] is error


def test_waiting_past_the_deadline_raises():
    with pytest.raises(TimeoutError):
        Mailbox().get(time.monotonic() + 0.05)


def test_an_async_reader_is_woken_and_a_closed_loop_is_noticed():
    box = Mailbox()

    async def main():
        reader = asyncio.ensure_future(box.aget(time.monotonic() + 30))
        await asyncio.sleep(0)  # the reader now waits
        await asyncio.get_running_loop().run_in_executor(None, box.put, chunk("hi", 1))
        return await reader

    assert asyncio.run(main()).text == "hi"

    loop = asyncio.new_event_loop()
    waiting = loop.create_task(box.aget(time.monotonic() + 30))
    loop.run_until_complete(asyncio.sleep(0))  # registers its waiter
    waiting._log_destroy_pending = False  # left pending on purpose: its loop is gone
    loop.close()
    with pytest.raises(ReaderGone):
        box.put(chunk("nobody", 2))
