"""Tokens from the engine to a reader: merged while the reader lags, errors kept, closed loops noticed."""

from __future__ import annotations

import asyncio
import time

import pytest

from nanoengine.api.outputs import Mailbox
from nanoengine.engine.loop import Tokens


def token(count: int) -> Tokens:
    """One sampled token, as the engine leaves it (the tests' ids are the counts)."""
    return Tokens([count], [-0.1 * count])


def test_a_lagging_reader_gets_the_tokens_merged_into_one_item():
    box = Mailbox()
    for i in range(1, 5):
        assert box.put(token(i))
    assert box.get(time.monotonic() + 1) == Tokens([1, 2, 3, 4], [-0.1, -0.2, -0.30000000000000004, -0.4])


def test_an_error_stays_whole_after_the_tokens_before_it():
    box = Mailbox()
    box.put(token(1))
    box.put(token(2))
    error = TimeoutError("late")
    box.put(error)
    got = [box.get(time.monotonic() + 1) for _ in range(2)]
    assert got[0].ids == [1, 2] and got[1] is error


def test_waiting_past_the_deadline_raises():
    with pytest.raises(TimeoutError):
        Mailbox().get(time.monotonic() + 0.05)


def test_an_async_reader_is_woken_and_a_closed_loop_is_noticed():
    box = Mailbox()

    async def main():
        reader = asyncio.ensure_future(box.aget(time.monotonic() + 30))
        await asyncio.sleep(0)  # the reader now waits
        await asyncio.get_running_loop().run_in_executor(None, box.put, token(1))
        return await reader

    assert asyncio.run(main()).ids == [1]

    loop = asyncio.new_event_loop()
    waiting = loop.create_task(box.aget(time.monotonic() + 30))
    loop.run_until_complete(asyncio.sleep(0))  # registers its waiter
    waiting._log_destroy_pending = False  # left pending on purpose: its loop is gone
    loop.close()
    assert box.put(token(2)) is False
