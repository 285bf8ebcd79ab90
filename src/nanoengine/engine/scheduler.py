"""Which sequences run at each step, and in which row of the KV cache pool each one lives.

Plain bookkeeping, no torch. The pool's rows are laid out so that a step's batch is always a
contiguous block of rows starting at row 0 (no gathering of scattered rows):

    rows [0, d)   the decoding sequences, one new token each per step
    row d         at most one sequence whose prompt is still being prefilled, chunk by chunk

New prompts are admitted, first come first served, only while no prompt is half prefilled and
rows are free; they are prefilled together in one batch under the step's token budget, and the
last of them may be left half done (it becomes row d). When a decoding sequence leaves, the last
decoding row moves into its place and the half-prefilled one moves down behind it, so a
departure costs at most two row copies.

Offline work (`Sequence.live` False: an `llm.generate` batch, whose results nobody reads token
by token) runs at full width. While no live sequence is in the engine, a step prefills up to
`offline_chunk` tokens (so does a batch of whole prompts while nothing decodes: no one waits for
a next token; a long live prompt is still cut in chunks of `prefill_chunk`), and offline
sequences may take every row of the pool but `LIVE_RESERVE` (live ones at most `rows`). A live
stream that arrives finds that row free, goes ahead of the offline prompts still waiting, and
has its prompt prefilled at the next step under the ordinary budget.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

MoveRow = Callable[[int, int, int], None]  # (from row, to row, positions to move)
LIVE_RESERVE = 1  # rows of the pool that offline sequences leave free for a live arrival


@dataclass(eq=False)
class Sequence:
    """One request inside the engine."""

    prompt_ids: list[int]
    max_new_tokens: int
    deadline: float  # time.monotonic() when the request runs out of time
    state: Any = None  # the engine's per-request objects (sampler, output builder, mailbox)
    pos: int = 0  # how many of its tokens have keys and values in the cache
    next_token: int = -1  # sampled and emitted, to be fed at the next decode step
    generated: int = 0
    aborted: bool = False  # set by the reader's side; the loop drops the sequence at the next step
    live: bool = True  # someone reads it as it comes; False for offline batch work (module docstring)

    @property
    def prefilled(self) -> bool:
        return self.pos >= len(self.prompt_ids)


@dataclass
class PrefillBatch:
    """Prompts to prefill this step: each sequence with the chunk of prompt tokens it gets."""

    first_row: int
    sequences: list[Sequence] = field(default_factory=list)
    chunks: list[list[int]] = field(default_factory=list)

    @property
    def padded_tokens(self) -> int:
        return len(self.sequences) * max((len(c) for c in self.chunks), default=0)


class Scheduler:
    def __init__(
        self, rows: int, prefill_chunk: int, move_row: MoveRow, pool_rows: int | None = None, offline_chunk: int | None = None
    ) -> None:
        self.rows = rows  # the most rows live sequences use
        self.pool_rows = max(pool_rows or rows, rows)
        self.prefill_chunk = prefill_chunk
        self.offline_chunk = max(offline_chunk or prefill_chunk, prefill_chunk)
        self.move_row = move_row
        self.waiting: deque[Sequence] = deque()  # live ones first, each kind first come first served
        self.decoding: list[Sequence] = []  # row i holds decoding[i]
        self.partial: Sequence | None = None  # row len(decoding), half prefilled

    def add(self, seq: Sequence) -> None:
        if seq.live and self.waiting and not self.waiting[-1].live:
            offline = next(i for i, s in enumerate(self.waiting) if not s.live)
            self.waiting.insert(offline, seq)  # ahead of the offline prompts
        else:
            self.waiting.append(seq)

    @property
    def offline_only(self) -> bool:
        """No live sequence is in the engine: the step may run at full width."""
        partial_live = self.partial is not None and self.partial.live
        return not (partial_live or any(s.live for s in self.decoding) or (self.waiting and self.waiting[0].live))

    def _row_for(self, seq: Sequence, batch: PrefillBatch) -> bool:
        """Whether `seq` may take a row beside the decoding ones and `batch`'s: a live one while
        fewer than `rows` live ones run and the pool has room; an offline one leaves
        `LIVE_RESERVE` rows free."""
        used = len(self.decoding) + len(batch.sequences)
        if seq.live:
            live = sum(s.live for s in self.decoding) + sum(s.live for s in batch.sequences)
            return used < self.pool_rows and live < self.rows
        return used < max(self.pool_rows - LIVE_RESERVE, 1)

    def __iter__(self) -> Iterator[Sequence]:
        yield from list(self.decoding)
        if self.partial is not None:
            yield self.partial
        yield from list(self.waiting)

    def __len__(self) -> int:
        return len(self.decoding) + (self.partial is not None) + len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.decoding) + (self.partial is not None)

    @property
    def next_row_pos(self) -> int:
        """Where the row after the decoding ones writes next: the half-prefilled prompt's next
        position, or 0 when the row is free (a padded decode step may write there: see
        `ModelRunner.decode`)."""
        return self.partial.pos if self.partial is not None else 0

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out, wherever it is, keeping the rows contiguous."""
        if seq is self.partial:
            self.partial = None
        elif seq in self.waiting:
            self.waiting.remove(seq)
        else:
            row, last = self.decoding.index(seq), len(self.decoding) - 1
            if row != last:
                self.move_row(last, row, self.decoding[last].pos)
                self.decoding[row] = self.decoding[last]
            self.decoding.pop()
            if self.partial is not None:
                self.move_row(last + 1, last, self.partial.pos)

    def next_prefill(self) -> PrefillBatch | None:
        """The prompt chunks to run this step: the half-prefilled prompt's next chunk alone, or
        new prompts while rows are free, their padded size within the token budget."""
        first_row = len(self.decoding)
        offline = self.offline_only
        chunk_len = self.offline_chunk if offline else self.prefill_chunk  # of one long prompt
        budget = self.offline_chunk if offline or not self.decoding else self.prefill_chunk  # of the whole batch
        if self.partial is not None:
            seq = self.partial
            chunk = seq.prompt_ids[seq.pos : seq.pos + chunk_len]
            return PrefillBatch(first_row, [seq], [chunk])
        batch = PrefillBatch(first_row)
        longest = 0
        while self.waiting and self._row_for(self.waiting[0], batch):
            seq = self.waiting[0]
            longest = max(longest, len(seq.prompt_ids))
            room = budget // (len(batch.sequences) + 1)  # per row, padded to the longest
            if batch.sequences and longest > room:
                break  # it would not fit whole beside the others: next step
            self.waiting.popleft()
            batch.sequences.append(seq)
            batch.chunks.append(seq.prompt_ids[:chunk_len])
            if len(seq.prompt_ids) > chunk_len:
                break  # a long prompt is chunked alone
        return batch if batch.sequences else None

    def prefill_done(self, batch: PrefillBatch) -> None:
        """After the batch ran: whole prompts start decoding; a half-done one stays partial."""
        self.partial = None
        for seq in batch.sequences:
            if seq.prefilled:
                self.decoding.append(seq)
            else:
                self.partial = seq  # only ever the last of the batch
