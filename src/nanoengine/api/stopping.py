"""Stop sequences over text that arrives a piece at a time."""

from __future__ import annotations

from collections.abc import Sequence


class StopChecker:
    """Ends a completion at the earliest stop string, and holds back text that might start one.

    `feed()` takes each new piece of decoded text and returns the part that is safe to emit:
    everything except the longest tail that is still the beginning of some stop string. So a
    stream never emits text that later turns out to belong to a stop string, and every
    occurrence of a stop string lies within the held-back tail plus the new piece.
    """

    def __init__(self, stop_sequences: Sequence[str], include_stop: bool = False) -> None:
        self.stop_sequences = tuple(stop_sequences)
        self.include_stop = include_stop
        self.held = ""  # text not emitted yet, because it may begin a stop string
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add decoded text; return what may be emitted now. Sets `stopped` when a stop string completes."""
        text = self.held + piece
        match = self._earliest(text)
        if match is not None:
            start, stop = match
            self.stopped, self.held = True, ""
            return text[: start + len(stop)] if self.include_stop else text[:start]
        keep = self._open_tail(text)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held-back text, released once no more text can follow."""
        text, self.held = self.held, ""
        return text

    def _earliest(self, text: str) -> tuple[int, str] | None:
        """The first occurrence of any stop string; of two starting together, the one complete first."""
        found = [(start, len(stop), stop) for stop in self.stop_sequences if (start := text.find(stop)) >= 0]
        if not found:
            return None
        start, _, stop = min(found)
        return start, stop

    def _open_tail(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        longest = max((len(stop) - 1 for stop in self.stop_sequences), default=0)
        for size in range(min(longest, len(text)), 0, -1):
            tail = text[-size:]
            if any(stop.startswith(tail) for stop in self.stop_sequences):
                return size
        return 0
