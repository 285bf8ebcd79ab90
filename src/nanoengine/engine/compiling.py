"""Compiled decode steps without the wait: compile in the background, switch over between steps.

`torch.compile` makes the one-token decode step of a single sequence several times faster on
CPU, but costs 35-40 s per cache length on a cold cache (about 10 s warm), which a process that
serves for minutes should not pay up front or in the middle of a stream. So the engine serves
eagerly; once it has decoded `after_tokens` tokens (it is not a one-shot run), each cache length
bucket that a one-row step uses is compiled by a thread of our own, on a scratch cache laid out
like the pool (so the graph's guards hold for the real one), and the engine uses it from the
next step on. Steps of several rows stay eager: their matrix products already run at the CPU's
full speed, and their shapes are too many to compile. Inductor keeps what it built in its
on-disk caches, so the next process on the machine gets there in seconds. A failure leaves the
engine eager, with a warning.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import torch

from ..model.decoder import CausalLM, KVCache

logger = logging.getLogger(__name__)

COMPILE_AFTER_TOKENS = 256  # decoded tokens before the background compile starts
RECOMPILE_LIMIT = 64  # one compiled graph per cache length bucket: more than dynamo's default 8
EXIT_JOIN_SECONDS = 300.0  # a cold compile takes 35-40 s on 2 quiet cores, minutes on a busy machine

Step = Callable[..., torch.Tensor]


class BackgroundCompile:
    def __init__(self, model: CausalLM, max_len: int, after_tokens: int = COMPILE_AFTER_TOKENS) -> None:
        self.model = model
        self.max_len = max_len
        self.after_tokens = after_tokens
        self.decoded = 0
        self.compiled: dict[int, Step] = {}  # cache length -> compiled one-row step
        self.seconds: dict[int, float] = {}
        self._asked: set[int] = set()
        self._todo: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.failed = False  # a compile raised: the engine stays eager

    def step_for(self, rows: int, length: int) -> Step | None:
        """The compiled step for a one-row decode over `length` cache positions, if built; else
        None (run eagerly), and have it built when the engine has served long enough."""
        if rows != 1 or self.failed:
            return None
        if length not in self._asked and self.decoded >= self.after_tokens:
            self._asked.add(length)
            self._todo.put(length)
            self._start()
        return self.compiled.get(length)

    def stop(self, join_seconds: float = EXIT_JOIN_SECONDS) -> None:
        """Compile nothing more, and wait for a compile under way to end: a thread still inside
        torch while the interpreter exits can abort the process, and a compile cannot be cut short."""
        if self._thread is None:
            return
        self._todo.put(None)
        if self._thread.is_alive():
            logger.info("waiting for the background compile under way to end (at most %.0f s)", join_seconds)
        self._thread.join(join_seconds)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="nanoengine-compile", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
        while (length := self._todo.get()) is not None:
            start = time.monotonic()
            try:
                step = self._compile(length)
            except Exception:  # the eager step is still there: keep serving with it
                logger.warning("compiling the decode step failed; staying eager", exc_info=True)
                self.failed = True
                return
            self.seconds[length] = time.monotonic() - start
            self.compiled[length] = step
            logger.info("decode step for %d cache positions compiled in %.0f s (in the background)", length, self.seconds[length])

    def _compile(self, length: int) -> Step:
        """Compile the one-row step for `length` positions and run it once on a scratch cache."""
        model, device = self.model, self.model.lm_head.weight.device
        step = torch.compile(model._forward, fullgraph=True, dynamic=False)
        scratch = KVCache(model.config, 1, self.max_len, model.compute_dtype, device, zero_lazily=True)
        with torch.inference_mode():
            ids = torch.zeros(1, 1, dtype=torch.long, device=device)
            step(ids, torch.full((1, 1), length - 1, device=device), scratch.view(1, length), True)
        return step
