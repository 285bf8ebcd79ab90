"""Decode steps replayed as CUDA graphs: how the runner runs a decode step on a GPU.

A one-token step of a small model is launch-bound on a GPU: hundreds of small kernels, each
launched from Python, keep the GPU waiting on the CPU. A CUDA graph records the step's kernels
once and replays them all with one call. Recorded from the eager step itself (no compiler), a
replay runs the very kernels the eager step runs, so its logits are the eager step's bit for bit.

A graph is bound to the addresses it was recorded with: its inputs (token ids and positions)
are copied into buffers of its own before each replay, and the KV cache view it writes is the
runner's view of the same (rows, length) bucket, which the cache keeps (the same tensors each
time). So one graph is recorded per (rows, cache length) bucket, the first time the runner meets
it: that step runs eagerly (its logits are that step's result), and the graph is recorded right
after with the same inputs (recording runs nothing). Its logits are left in memory of the graph's
own, overwritten by the next replay of any graph (they share one memory pool: one step runs at a
time, and each step's logits are read before the next), so a caller reads them before the next
step. A recording that fails leaves the runner eager, with a warning.
"""

from __future__ import annotations

import logging
import torch

from ..model.decoder import CausalLM
from ..model.kv_cache import KVCache

logger = logging.getLogger(__name__)

Shape = tuple[int, int]  # (rows, cache length) of a decode step


class StepGraph:
    """One decode step recorded for a (rows, length) bucket: call it as the model, with new ids and positions."""

    def __init__(self, model: CausalLM, ids: torch.Tensor, pos: torch.Tensor, view: KVCache, pool, stream) -> None:
        self.ids, self.pos = ids.clone(), pos.clone()  # (rows, 1) each: the graph reads these addresses
        self.view = view
        self.graph = torch.cuda.CUDAGraph()
        # Recorded without `torch.cuda.graph`'s preamble (a device-wide sync, a garbage collection
        # and emptying the allocator's cache), which cost more than the recording itself; the
        # stream already waits for the eager run. thread_local: a request submitted meanwhile
        # may allocate on the GPU from its own thread.
        with torch.cuda.stream(stream):
            self.graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                self.logits = model(self.ids, self.pos, view, last_only=True)  # (rows, 1, V), the graph's memory
            finally:
                self.graph.capture_end()

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, view: KVCache, last_only: bool = True) -> torch.Tensor:
        assert view is self.view and last_only, "a graph replays the step it recorded"
        self.ids.copy_(ids, non_blocking=True)
        self.pos.copy_(pos, non_blocking=True)
        self.graph.replay()
        return self.logits


class GraphSteps:
    """The runner's recorded decode steps on a GPU, one per (rows, length) bucket."""

    def __init__(self, model: CausalLM) -> None:
        self.model = model
        self.graphs: dict[Shape, StepGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()  # shared: one step runs at a time
        self.stream = torch.cuda.Stream()  # where steps are recorded (and run once before)
        self.failed = False

    def record(self, ids: torch.Tensor, pos: torch.Tensor, view: KVCache) -> torch.Tensor:
        """Run the step for `ids` (rows, 1) eagerly, then record it for its bucket; return the
        eager run's logits (rows, 1, V). The eager run is on the stream the recording uses, so
        that what the stream sets up at its first use (the matrix library's workspace) is set up
        before recording; recording runs nothing, so the cache holds what the eager run wrote."""
        shape = (ids.shape[0], view.k.shape[3])
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            logits = self.model(ids, pos, view, last_only=True)  # (rows, 1, V)
        torch.cuda.current_stream().wait_stream(self.stream)
        logits.record_stream(torch.cuda.current_stream())  # read there next: not to be reused before
        try:
            self.graphs[shape] = StepGraph(self.model, ids, pos, view, self.pool, self.stream)
        except Exception:  # the eager step is still there: keep serving with it
            logger.warning("recording the decode step as a CUDA graph failed; staying eager", exc_info=True)
            self.failed = True
        else:
            logger.info("decode step for %d rows x %d cache positions recorded as a CUDA graph", *shape)
        return logits
