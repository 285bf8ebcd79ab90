"""A batch job's progress: lines done of the total, tokens per second, time left; and its summary.

A bar on a terminal (tqdm, when installed), else a log line every `LOG_SECONDS`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

LOG_SECONDS = 10.0


@dataclass(frozen=True)
class BatchSummary:
    """What one run of a batch did: lines in the input, answered before it started, answered by it."""

    total: int
    already_done: int
    succeeded: int
    failed: int
    completion_tokens: int
    seconds: float


class Progress:
    """Counts the lines written; shows done/total, tok/s and the time left."""

    def __init__(self, total: int, already_done: int, desc: str, show: bool | None) -> None:
        self.total, self.already_done, self.desc = total, already_done, desc
        self.succeeded = self.failed = self.tokens = 0
        self.show = sys.stderr.isatty() if show is None else show
        self._bar: Any = None
        self._start = self._last_log = time.monotonic()

    def __enter__(self) -> Progress:
        if self.show:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=self.total, initial=self.already_done, desc=self.desc, unit="line")
            except ImportError:
                pass
        if self.already_done:
            logger.info("%s: %d of %d lines already answered, resuming", self.desc, self.already_done, self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
        self._log()

    def counting(self, write: Callable[[dict[str, Any]], None]) -> Callable[..., None]:
        """`write(record)`, counting each line and the tokens generated for it."""

        def write_and_count(record: dict[str, Any], tokens: int = 0) -> None:
            write(record)
            response = record["response"]
            if response is not None and response["status_code"] == 200:
                self.succeeded += 1
            else:
                self.failed += 1
            self.tokens += tokens
            self._advance()

        return write_and_count

    @property
    def rate(self) -> float:
        """Tokens generated per second so far."""
        return self.tokens / max(time.monotonic() - self._start, 1e-9)

    def _advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(f"{self.rate:.0f} tok/s, {self.failed} failed", refresh=False)
        elif self.show and time.monotonic() - self._last_log >= LOG_SECONDS:
            self._log()

    def _log(self) -> None:
        self._last_log = time.monotonic()
        answered = self.succeeded + self.failed
        done, elapsed = self.already_done + answered, time.monotonic() - self._start
        left = (self.total - done) * elapsed / answered if answered else float("nan")
        logger.info(
            "%s: %d of %d lines (%d failed), %.0f tok/s, %.0f s left",
            self.desc, done, self.total, self.failed, self.rate, left,
        )  # fmt: skip

    def summary(self) -> BatchSummary:
        return BatchSummary(
            self.total, self.already_done, self.succeeded, self.failed, self.tokens, time.monotonic() - self._start
        )
