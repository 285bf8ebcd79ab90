"""One batched forward pass over the KV cache pool: a decode step, or a batch of prompt chunks.

The pool (`KVCache` with one row per slot) is allocated once, for `rows` sequences of at most
`max_len` tokens, so its memory is bounded whatever requests ask for. Each step runs over a view
of the rows in use and of the positions in use, rounded up to `LENGTH_BUCKET`, so attention costs
what is cached rather than what is reserved, and the shapes a compiled step sees stay few.
"""

from __future__ import annotations

import torch

from .compiling import BackgroundCompile
from ..model.decoder import CausalLM, KVCache
from .scheduler import PrefillBatch, Sequence

LENGTH_BUCKET = 256


class ModelRunner:
    def __init__(self, model: CausalLM, rows: int, max_len: int, compiler: BackgroundCompile | None = None) -> None:
        self.model = model
        self.compiler = compiler
        self.eager_only = 0  # > 0 while interventions hook the model: a compiled step would skip them
        self.device = model.lm_head.weight.device
        self.cache = KVCache(model.config, rows, max_len, model.compute_dtype, self.device, zero_lazily=True)

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.cache.copy_row(src, dst, length)

    @torch.inference_mode()
    def decode(self, sequences: list[Sequence]) -> torch.Tensor:
        """Feed each sequence (row i = sequences[i]) its next token at its own position; return
        the next-token logits (B, V)."""
        ids = torch.tensor([[s.next_token] for s in sequences], device=self.device)  # (B, 1)
        pos = torch.tensor([[s.pos] for s in sequences], device=self.device)  # (B, 1)
        view = self.cache.view(len(sequences), self._bucket(max(s.pos for s in sequences) + 1))
        if self.compiler is not None and not self.eager_only:
            self.compiler.decoded += len(sequences)
            step = self.compiler.step_for(len(sequences), view.max_len)
            if step is not None:
                return step(ids, pos, view, True)[:, -1]  # (B, V), the compiled step
        return self.model(ids, pos, view, last_only=True)[:, -1]  # (B, V)

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
        view = self.cache.view(len(ids), self._bucket(int(pos_t.max()) + 1), first_row=batch.first_row)
        return self.model(ids_t, pos_t, view, last_only=True)[:, -1]  # (B, V)

    def _bucket(self, needed: int) -> int:
        return min(-(-needed // LENGTH_BUCKET) * LENGTH_BUCKET, self.cache.max_len)
