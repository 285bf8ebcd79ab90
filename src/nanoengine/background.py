"""Running a request's token loop in a worker thread, so that an asyncio event loop never blocks.

The worker computes one item at a time and then waits until the event loop has taken it, so it
is never more than one decode step ahead of its reader: a reader that stops reading (a `break`,
a cancelled task, a dropped stream) leaves at most one more step to run. Cancelling, the
request's deadline, and interpreter exit all wake and end the worker.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from itertools import chain
from typing import Any

from .errors import RequestTimeoutError

logger = logging.getLogger(__name__)

READY = object()  # first item: the request is prepared (model loaded, prompt tokenized)
END = object()  # last item of a stream that ran to its end

EXIT_JOIN_SECONDS = 10.0  # at interpreter exit, how long to wait for workers to leave torch


Start = Callable[[threading.Event], tuple[Iterator[Any], float]]


class Worker:
    """One request's thread: posts READY, then each item, then END (or the error raised).

    `start(cancel)` prepares the request and returns its items (computed as they are iterated)
    and its deadline, on the `time.monotonic()` clock.
    """

    def __init__(self, start: Start, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._taken = threading.Semaphore(0)  # released each time the reader takes an item
        self._cancel = threading.Event()
        self._timeout = timeout
        self._deadline = math.inf  # set by `start`, before READY is posted
        self._thread = threading.Thread(target=self._run, args=(start,), name="nanoengine-request", daemon=True)
        _track(self)
        self._thread.start()

    def cancel(self) -> None:
        """Stop the work at the next step boundary (thread-safe, idempotent)."""
        self._cancel.set()
        self._taken.release()  # wake the worker if it waits for the reader

    async def get(self) -> Any:
        """The next item, waiting at most until the deadline; an error item is raised here."""
        item = self._queue.get_nowait() if not self._queue.empty() else await self._wait_for_item()
        self._taken.release()
        if isinstance(item, BaseException):
            raise item
        return item

    async def _wait_for_item(self) -> Any:
        left = self._deadline - time.monotonic()  # no limit before READY: a model loads once
        getter = asyncio.ensure_future(self._queue.get())
        try:
            # asyncio.wait, not wait_for: on Python 3.11 wait_for can swallow a cancellation.
            done, _ = await asyncio.wait({getter}, timeout=max(left, 0.0) if left < math.inf else None)
        finally:
            getter.cancel()  # only if still waiting (our own task was cancelled, or time is up)
        if not done:
            self.cancel()
            raise RequestTimeoutError(f"the request ran past its timeout of {self._timeout:g} s")
        return getter.result()

    def _run(self, start: Start) -> None:
        try:
            last = self._produce(start)
        except BaseException as err:  # handed to the reader, who raises it
            last = err
        try:
            if last is not None:
                self._post(last)
        finally:
            _forget(self)

    def _produce(self, start: Start) -> object | None:
        """Post READY and each item, one at a time; return END, or None when stopped early."""
        items, self._deadline = start(self._cancel)
        with closing(items):
            for item in chain([READY], items):
                if not (self._post(item) and self._reader_took_it()):
                    return None
        return None if self._cancel.is_set() else END

    def _reader_took_it(self) -> bool:
        """Wait until the reader has taken the last item; False on cancel or at the deadline."""
        left = self._deadline - time.monotonic()
        return self._taken.acquire(timeout=max(left, 0.0)) and not self._cancel.is_set()

    def _post(self, item: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            return True
        except RuntimeError:  # the event loop is closed: nobody will read
            self._cancel.set()
            return False


_live: set[Worker] = set()
_live_lock = threading.Lock()
_atexit_registered = False


def _track(worker: Worker) -> None:
    global _atexit_registered
    with _live_lock:
        _live.add(worker)
        if not _atexit_registered:
            atexit.register(stop_workers)
            _atexit_registered = True


def _forget(worker: Worker) -> None:
    with _live_lock:
        _live.discard(worker)


def stop_workers(join_seconds: float = EXIT_JOIN_SECONDS) -> None:
    """Cancel every worker and wait for it to leave torch.

    Registered to run at interpreter exit: a daemon thread still inside torch while the
    interpreter finalizes can abort the whole process.
    """
    with _live_lock:
        workers = list(_live)
    for worker in workers:
        worker.cancel()
    end = time.monotonic() + join_seconds
    for worker in workers:
        worker._thread.join(max(end - time.monotonic(), 0.0))
        if worker._thread.is_alive():
            logger.warning("a nanoengine worker thread did not stop within %.0f s", join_seconds)
