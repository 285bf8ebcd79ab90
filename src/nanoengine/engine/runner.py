"""One batched forward pass over the KV cache pool: a decode step, or a batch of prompt chunks.

The runner owns execution: which step runs compiled, eagerly (on a CPU, a twin of the model with
faster products: `compiling.in_eager_form`), or on a GPU as a recorded CUDA graph is decided
here (`_plan`, with `compiling.py` and `graphs.py`), never inside the model. The pool (`KVCache`
with one row per slot) is allocated once, for `rows` sequences of at most `max_len` tokens, so
its memory is bounded whatever requests ask for. Each step runs over a view of the rows in use
and of the positions in use, so attention costs what is cached rather than what is reserved: an
eager pass's view ends at the next multiple of `LENGTH_ALIGN` positions (a decode step's
attention reads every position of its view, and at 32 rows costs as much as the matrix
products), a compiled or recorded step's at the next multiple of `LENGTH_BUCKET`, so that the
shapes it sees stay few. A compiled or recorded decode step also
rounds its rows up to a bucket (`compiling.row_bucket`): the padding rows feed token 0 at a
position whose keys nobody reads (see `decode`), and their logits are dropped, so no real row's
tokens change.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..model.decoder import CausalLM
from ..model.kv_cache import KVCache
from .compiling import BackgroundCompile, ForegroundCompile, Step, foreground_compiler, in_eager_form, row_bucket
from .graphs import GraphSteps
from .scheduler import PrefillBatch, Sequence

LENGTH_BUCKET = 256  # a compiled or recorded step's cache view: a multiple of this
LENGTH_ALIGN = 64  # an eager step's
# Positions whose logits `sequence_logprobs` forms at once: on a CPU few enough to stay in its
# cache (128 x SmolLM2's vocabulary: 25 MB), on a GPU many (4,096: 0.8 GB), as its kernels want.
HEAD_CHUNK_CPU, HEAD_CHUNK_GPU = 128, 4096


class Plan(NamedTuple):
    """How one decode step runs: the compiled or recorded step (None: eagerly), the rows it runs
    over (padded up to a bucket for a compiled or recorded step), its cache view's length, and
    whether to record it as a CUDA graph after it ran eagerly."""

    step: Step | None
    rows: int
    length: int
    record: bool = False


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        rows: int,
        max_len: int,
        compiler: BackgroundCompile | ForegroundCompile | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        self.model = model
        self.eager = in_eager_form(model)  # what eager passes run: the model, or its faster twin on CPU
        self.compiler = compiler if compiler is not None else foreground_compiler(model)
        self.eager_only = 0  # > 0 while interventions hook the model: a compiled or recorded step would skip them
        self.device = model.lm_head.weight.device
        self.cache = KVCache(model.config, rows, max_len, model.compute_dtype, self.device, zero_lazily=True)
        # On a GPU, decode steps are replayed as CUDA graphs, unless a compile was asked for.
        asked = isinstance(self.compiler, ForegroundCompile)
        self.graphs = GraphSteps(model) if cuda_graphs and self.device.type == "cuda" and not asked else None

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.cache.copy_row(src, dst, length)

    @torch.inference_mode()
    def decode(self, sequences: list[Sequence], next_row_pos: int = 0) -> torch.Tensor:
        """Feed each sequence (row i = sequences[i]) its next token at its own position; return
        the next-token logits (B, V).

        A compiled or recorded step runs over the rows rounded up to a bucket. The padding rows
        write keys where no one will read them: the first, row len(sequences), at `next_row_pos`
        (the caller's half-prefilled prompt, if any, lives there: its next chunk overwrites that
        position before anything attends it), the others at position 0 of free rows.
        """
        rows = len(sequences)
        plan = self._plan(rows, max(s.pos for s in sequences) + 1, next_row_pos)
        ids = [s.next_token for s in sequences] + [0] * (plan.rows - rows)
        pos = [s.pos for s in sequences] + [next_row_pos] + [0] * (plan.rows - rows - 1)
        ids_t = torch.tensor(ids, device=self.device)[:, None]  # (padded, 1)
        pos_t = torch.tensor(pos[: plan.rows], device=self.device)[:, None]  # (padded, 1)
        view = self.cache.view(plan.rows, plan.length)
        if plan.step is not None:
            return plan.step(ids_t, pos_t, view, True)[:rows, -1]  # (B, V), the compiled or recorded step
        if plan.record:  # eager this once, then recorded: replayed from this bucket's next step on
            return self.graphs.record(ids_t, pos_t, view)[:rows, -1]  # (B, V)
        return self.eager(ids_t, pos_t, view, last_only=True)[:rows, -1]  # (B, V), eager

    def _plan(self, rows: int, needed: int, next_row_pos: int) -> Plan:
        """How a decode of `rows` sequences over `needed` cache positions runs: a compiled step if
        one is built for its bucket, else on a GPU its recorded graph (recorded after running
        eagerly the first time), else eagerly over the rows as they are."""
        eager = Plan(None, rows, self.fit(needed))
        if self.eager_only or (self.compiler is None and self.graphs is None):
            return eager
        length, padded = self.bucket(needed), row_bucket(rows, self.cache.batch_size)
        if padded > rows and next_row_pos >= length:
            return eager  # the half-prefilled row is beyond this view: no room to pad safely
        if self.compiler is not None:
            self.compiler.decoded += rows
            step = self.compiler.step_for(padded, length)
            if step is not None:
                return Plan(step, padded, length)
        if self.graphs is None or self.graphs.failed:
            return eager
        step = self.graphs.graphs.get((padded, length))
        return Plan(step, padded, length, record=step is None)

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
        return self.eager(ids_t, pos_t, view, last_only=True)[:, -1]  # (B, V)

    def bucket(self, needed: int) -> int:
        """A compiled step's cache view for `needed` positions: a multiple of `LENGTH_BUCKET`, at most the pool's."""
        return min(-(-needed // LENGTH_BUCKET) * LENGTH_BUCKET, self.cache.max_len)

    def fit(self, needed: int) -> int:
        """An eager pass's cache view for `needed` positions: a multiple of `LENGTH_ALIGN`, at most the pool's."""
        return min(-(-needed // LENGTH_ALIGN) * LENGTH_ALIGN, self.cache.max_len)


def right_padded(sequences: list[list[int]], device: torch.device) -> torch.Tensor:
    """The sequences in one batch (B, T), right-padded with token 0."""
    ids = torch.zeros(len(sequences), max(len(seq) for seq in sequences), dtype=torch.long, device=device)  # (B, T)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, device=device)
    return ids


def next_token_logits(model: torch.nn.Module, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences right-padded into one batch (B, T) with token 0, and the float32 logits
    (B, T-1, V) with which position t predicts token t+1, from one pass without a KV cache
    (causal attention: the padding after a sequence changes nothing before it)."""
    ids = right_padded(sequences, model.lm_head.weight.device)  # (B, T)
    with torch.inference_mode():
        return ids, in_eager_form(model)(ids)[:, :-1].float()  # (B, T), (B, T-1, V)


def sequence_logprobs(model: torch.nn.Module, sequences: list[list[int]]) -> list[list[float]]:
    """Per sequence, log p(token t | tokens before t) for t = 1 .. len - 1, in one right-padded
    pass without a KV cache (what `llm.score` runs, batch by batch).

    The head runs on the real positions alone, `HEAD_CHUNK_CPU` (or `_GPU`) at a time, each chunk's log-softmax
    taken while its logits are still in the cache: the whole (tokens x vocabulary) logits of a
    2,048-token batch are 400 MB for SmolLM2, which the log-softmax read and wrote several times
    over (14% of `llm.score`'s time)."""
    device = model.lm_head.weight.device
    ids = right_padded(sequences, device)  # (B, T)
    B, T = ids.shape
    lengths = torch.tensor([len(seq) for seq in sequences], device=device)  # (B,)
    scored = torch.arange(T - 1, device=device) < (lengths[:, None] - 1)  # (B, T-1): positions with a next token
    with torch.inference_mode():
        model = in_eager_form(model)
        hidden = model.hidden_states(ids, torch.arange(T, device=device).expand(B, T), None)  # (B, T, C)
        hidden, targets = hidden[:, :-1][scored], ids[:, 1:][scored]  # (N, C), (N,): the N real positions
        values = torch.empty(len(targets), device=device)  # (N,)
        chunk = HEAD_CHUNK_CPU if device.type == "cpu" else HEAD_CHUNK_GPU
        for start in range(0, len(targets), chunk):
            logits = model.logits_of(hidden[start : start + chunk]).float()  # (chunk, V)
            values[start : start + chunk] = logits.gather(-1, targets[start : start + chunk, None])[:, 0] - logits.logsumexp(-1)
    return [row.tolist() for row in values.cpu().split((lengths - 1).tolist())]
