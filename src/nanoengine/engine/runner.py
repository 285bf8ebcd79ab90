"""One batched forward pass over the KV cache pool: a decode step, or a batch of prompt chunks.

The runner owns execution: which step runs compiled or eagerly is decided here (with
`compiling.py`), never inside the model. The pool (`KVCache` with one row per slot) is allocated
once, for `rows` sequences of at most `max_len` tokens, so its memory is bounded whatever requests
ask for. Each step runs over a view of the rows in use and of the positions in use, so attention
costs what is cached rather than what is reserved: an eager pass's view ends at the next multiple
of `LENGTH_ALIGN` positions (a decode step's attention reads every position of its view, and at
32 rows costs as much as the matrix products), a compiled step's at the next multiple of
`LENGTH_BUCKET`, so that the shapes it sees stay few. A compiled decode step also rounds its rows
up to a bucket (`compiling.row_bucket`): the padding rows feed token 0 at a position whose keys
nobody reads (see `decode`), and their logits are dropped, so no real row's tokens change.
"""

from __future__ import annotations

import torch

from ..model.decoder import CausalLM
from ..model.kv_cache import KVCache
from .compiling import BackgroundCompile, ForegroundCompile, foreground_compiler, row_bucket
from .scheduler import PrefillBatch, Sequence

LENGTH_BUCKET = 256  # a compiled step's cache view: a multiple of this
LENGTH_ALIGN = 64  # an eager step's
HEAD_CHUNK = 128  # positions whose logits `sequence_logprobs` forms at once: 25 MB for SmolLM2, within L3


class ModelRunner:
    def __init__(
        self, model: CausalLM, rows: int, max_len: int, compiler: BackgroundCompile | ForegroundCompile | None = None
    ) -> None:
        self.model = model
        self.compiler = compiler if compiler is not None else foreground_compiler(model)
        self.eager_only = 0  # > 0 while interventions hook the model: a compiled step would skip them
        self.device = model.lm_head.weight.device
        self.cache = KVCache(model.config, rows, max_len, model.compute_dtype, self.device, zero_lazily=True)

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.cache.copy_row(src, dst, length)

    @torch.inference_mode()
    def decode(self, sequences: list[Sequence], next_row_pos: int = 0) -> torch.Tensor:
        """Feed each sequence (row i = sequences[i]) its next token at its own position; return
        the next-token logits (B, V).

        A compiled step runs over the rows rounded up to a bucket. The padding rows write keys
        where no one will read them: the first, row len(sequences), at `next_row_pos` (the
        caller's half-prefilled prompt, if any, lives there: its next chunk overwrites that
        position before anything attends it), the others at position 0 of free rows.
        """
        rows = len(sequences)
        needed = max(s.pos for s in sequences) + 1
        bucket = self.bucket(needed)
        step, padded = self._compiled_step(rows, bucket, next_row_pos)
        length = bucket if step is not None else self.fit(needed)
        ids = [s.next_token for s in sequences] + [0] * (padded - rows)
        pos = [s.pos for s in sequences] + [next_row_pos] + [0] * (padded - rows - 1)
        ids_t = torch.tensor(ids, device=self.device)[:, None]  # (padded, 1)
        pos_t = torch.tensor(pos[:padded], device=self.device)[:, None]  # (padded, 1)
        view = self.cache.view(padded, length)
        if step is None:
            return self.model(ids_t, pos_t, view, last_only=True)[:, -1]  # (B, V), eager
        return step(ids_t, pos_t, view, True)[:rows, -1]  # (B, V), the compiled step

    def _compiled_step(self, rows: int, length: int, next_row_pos: int):
        """The compiled step for this decode, if there is one, and the rows it runs over."""
        if self.compiler is None or self.eager_only:
            return None, rows
        self.compiler.decoded += rows
        padded = row_bucket(rows, self.cache.batch_size)
        if padded > rows and next_row_pos >= length:
            return None, rows  # the half-prefilled row is beyond this view: no room to pad safely
        step = self.compiler.step_for(padded, length)
        return (step, padded) if step is not None else (None, rows)

    @torch.inference_mode()
    def prefill(self, batch: PrefillBatch) -> torch.Tensor:
        """Run each sequence's chunk of prompt at its next positions; return the logits (B, V) after
        each chunk's last token.

        Chunks of different lengths are padded on the left, so that every row's last token is in
        the last column. Padding tokens get the positions just after the row's real ones: no real
        token attends them (they are later), and decoding overwrites what they wrote.
        """
        T = max(len(c) for c in batch.chunks)
        ids, pos = [], []
        for seq, chunk in zip(batch.sequences, batch.chunks):
            pad, start = T - len(chunk), seq.pos
            ids.append([0] * pad + chunk)
            pos.append(list(range(start + len(chunk), start + T)) + list(range(start, start + len(chunk))))
        ids_t = torch.tensor(ids, device=self.device)  # (B, T)
        pos_t = torch.tensor(pos, device=self.device)  # (B, T)
        view = self.cache.view(len(ids), self.fit(int(pos_t.max()) + 1), first_row=batch.first_row)
        return self.model(ids_t, pos_t, view, last_only=True)[:, -1]  # (B, V)

    def bucket(self, needed: int) -> int:
        """A compiled step's cache view for `needed` positions: a multiple of `LENGTH_BUCKET`, at most the pool's."""
        return min(-(-needed // LENGTH_BUCKET) * LENGTH_BUCKET, self.cache.max_len)

    def fit(self, needed: int) -> int:
        """An eager pass's cache view for `needed` positions: a multiple of `LENGTH_ALIGN`, at most the pool's."""
        return min(-(-needed // LENGTH_ALIGN) * LENGTH_ALIGN, self.cache.max_len)


def next_token_logits(model: torch.nn.Module, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences right-padded into one batch (B, T) with token 0, and the float32 logits
    (B, T-1, V) with which position t predicts token t+1, from one pass without a KV cache
    (causal attention: the padding after a sequence changes nothing before it)."""
    device = model.lm_head.weight.device
    longest = max(len(ids) for ids in sequences)
    ids = torch.zeros(len(sequences), longest, dtype=torch.long, device=device)  # (B, T)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, device=device)
    with torch.inference_mode():
        return ids, model(ids)[:, :-1].float()  # (B, T), (B, T-1, V)


def sequence_logprobs(model: torch.nn.Module, sequences: list[list[int]]) -> list[list[float]]:
    """Per sequence, log p(token t | tokens before t) for t = 1 .. len - 1, in one right-padded
    pass without a KV cache (what `llm.score` runs, batch by batch).

    The head runs on the real positions alone, `HEAD_CHUNK` at a time, each chunk's log-softmax
    taken while its logits are still in the cache: the whole (tokens x vocabulary) logits of a
    2,048-token batch are 400 MB for SmolLM2, which the log-softmax read and wrote several times
    over (14% of `llm.score`'s time)."""
    device = model.lm_head.weight.device
    longest = max(len(ids) for ids in sequences)
    ids = torch.zeros(len(sequences), longest, dtype=torch.long, device=device)  # (B, T)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, device=device)
    lengths = torch.tensor([len(seq) for seq in sequences], device=device)
    scored = torch.arange(longest - 1, device=device) < (lengths[:, None] - 1)  # (B, T-1): positions with a next token
    with torch.inference_mode():
        positions = torch.arange(longest, device=device).expand(len(sequences), longest)  # (B, T)
        hidden = model.hidden_states(ids, positions, None)[:, :-1][scored]  # (N, C), N real positions
        targets = ids[:, 1:][scored]  # (N,)
        values = torch.empty(len(targets), device=device)  # (N,)
        for start in range(0, len(targets), HEAD_CHUNK):
            end = start + HEAD_CHUNK
            logits = model.logits_of(hidden[start:end]).float()  # (chunk, V)
            values[start:end] = logits.gather(-1, targets[start:end, None])[:, 0] - logits.logsumexp(-1)
    return [chunk.tolist() for chunk in values.cpu().split((lengths - 1).tolist())]
