"""A progress bar for long batch calls (`llm.generate`, `llm.score`): items done and tokens/s.

tqdm draws it when installed; otherwise a log line marks each tenth. Shown by default for 16
items or more when stderr is a terminal.
"""

from __future__ import annotations

import logging
import sys
import time


class Progress:
    def __init__(self, desc: str, total: int, unit: str, show: bool | None, logger: logging.Logger) -> None:
        self.desc, self.total, self.unit, self.logger = desc, total, unit, logger
        self.shown = show if show is not None else total >= 16 and sys.stderr.isatty()
        self.done, self.tokens, self.start = 0, 0, time.monotonic()
        self.bar = None
        if self.shown:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc=desc, unit=unit)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, tokens: int) -> None:
        """One more item done, with its `tokens`."""
        self.done, self.tokens = self.done + 1, self.tokens + tokens
        if not self.shown:
            return
        rate = self.tokens / max(time.monotonic() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)
            self.bar.update()
        elif self.done % max(self.total // 10, 1) == 0 or self.done == self.total:
            self.logger.info("%s: %d of %d %ss done, %.0f tok/s", self.desc, self.done, self.total, self.unit, rate)
