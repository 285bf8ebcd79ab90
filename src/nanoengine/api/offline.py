"""Many prompts through the engine as offline work, for `llm.generate`.

The requests are checked and tokenized before any work, then fed to the engine as offline work
(`scheduler.py`: full-width steps) through a bounded window, longest prompts first, so that
prompts of similar lengths prefill together and thousands of prompts never sit in the engine at
once. Each in-flight request is read by an asyncio task on a thread of our own (the caller may
be inside an event loop, a notebook's); results come out in the order they finish, and closing
the iterator cancels the tasks, which stops their requests at the engine's next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Iterator

from ..progress import Progress
from ..params import CompletionParams
from .completion import submit
from .models import LoadedModel
from .outputs import AsyncCompletionStream, collect
from .types import CompletionOutput

logger = logging.getLogger(__name__)

WINDOW_PER_ROW = 2  # requests in flight per row of the engine's pool: the next ones are queued, ready
_DONE = object()


def run_batch(
    loaded: LoadedModel, requests: list[CompletionParams], prompt_ids: list[list[int]]
) -> Iterator[tuple[int, CompletionOutput]]:
    """(index, output) of every request, as each finishes; an error ends the iteration with it."""
    results: queue.SimpleQueue = queue.SimpleQueue()
    batch = _Batch(loaded, requests, prompt_ids, results)
    batch.thread.start()
    try:
        for _ in range(len(requests)):
            item = results.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        batch.cancel()
        batch.thread.join()


class _Batch:
    """The reading thread: an event loop that keeps the window full and reports each result."""

    def __init__(self, loaded, requests, prompt_ids, results: queue.SimpleQueue) -> None:
        self.loaded, self.requests, self.prompt_ids, self.results = loaded, requests, prompt_ids, results
        self.window = WINDOW_PER_ROW * loaded.engine.scheduler.pool_rows
        self.loop: asyncio.AbstractEventLoop | None = None
        self.main: asyncio.Task | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="nanoengine-generate", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._all())
        except asyncio.CancelledError:
            pass
        except BaseException as err:  # handed to the caller's thread
            self.results.put(err)
        finally:
            self.ready.set()

    def cancel(self) -> None:
        """Stop what is still running (nothing, once every result is in)."""
        self.ready.wait()
        if self.main is not None and not self.main.done():
            try:
                self.loop.call_soon_threadsafe(self.main.cancel)
            except RuntimeError:  # the loop has just closed: nothing left to stop
                pass

    async def _all(self) -> None:
        self.loop, self.main = asyncio.get_running_loop(), asyncio.current_task()
        self.ready.set()
        room = asyncio.Semaphore(self.window)
        order = sorted(range(len(self.requests)), key=lambda i: -len(self.prompt_ids[i]))
        tasks = []
        try:
            for index in order:
                await room.acquire()
                tasks.append(asyncio.ensure_future(self._one(index, room)))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, index: int, room: asyncio.Semaphore) -> None:
        try:
            request, ids = self.requests[index], self.prompt_ids[index]
            stream = AsyncCompletionStream("", *submit(request, self.loaded, ids, live=False))
            chunks = [response.output async for response in stream]
            self.results.put((index, collect(request, chunks)))
        finally:
            room.release()


def with_progress(
    results: Iterator[tuple[int, CompletionOutput]], total: int, show: bool | None
) -> Iterator[tuple[int, CompletionOutput]]:
    """`results` as they come, with a progress bar of prompts done and generated tokens/s."""
    with Progress("generate", total, "prompt", show, logger) as progress:
        for index, output in results:
            progress.update(output.num_completion_tokens)
            yield index, output
