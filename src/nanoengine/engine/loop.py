"""The engine: one loop, in one thread, that owns a loaded model and runs every request on it.

Requests are added (`submit`) and aborted from any thread. Each step of the loop:

1. drops the sequences whose reader left and fails those past their deadline;
2. runs one decode token for every decoding sequence, as one batch (`runner.decode`);
3. prefills new prompts, or the next chunk of a long one, under a per-step token budget
   (`runner.prefill`), so a long prompt delays the others' next token by one chunk at most;
4. samples each row with its own request's parameters (`sampling.sample`) and leaves the token
   in the request's outbox (`Tokens`);
5. frees the rows of the sequences that finished: at an end-of-sequence token or at
   `max_new_tokens`. Stop strings are the request side's to find (`api/outputs.py`): it
   detokenizes on the reader's thread and aborts the request when one completes.

The loop never waits for a reader: a slow one finds its tokens merged into one item.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .compiling import COMPILE_AFTER_TOKENS, BackgroundCompile
from ..errors import InvalidParameterError, RequestTimeoutError
from ..model.decoder import CausalLM
from .runner import ModelRunner
from .sampling import Sampler, SamplingParams, sample, top_alternatives
from .scheduler import PrefillBatch, Scheduler, Sequence
from ..params import CompletionParams

logger = logging.getLogger(__name__)

EXIT_JOIN_SECONDS = 10.0  # at interpreter exit, how long to wait for a loop to leave torch
OFFLINE_CHUNK = 2048  # prompt tokens prefilled per step while no live sequence waits on the engine


@dataclass(frozen=True)
class EngineSettings:
    """How an engine is sized: concurrent sequences (rows of the KV pool), the longest sequence
    (prompt plus new tokens) a row holds, and the prompt tokens prefilled per step; and whether
    it compiles its decode step in the background once it has served a while (`compiling.py`),
    or on a GPU replays it as a CUDA graph (`graphs.py`)."""

    max_batch_size: int = 32
    max_seq_len: int = 4096
    prefill_chunk: int = 256
    background_compile: bool = True
    cuda_graphs: bool = True


@dataclass
class Tokens:
    """What the loop hands a request's reader: the tokens sampled since its last read, each with
    its log-probability under the model."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    # Per token, its likeliest (token id, log-prob) alternatives, for a request that asked.
    alternatives: list[list[tuple[int, float]]] | None = None

    def then(self, later: Tokens) -> Tokens:
        """These tokens followed by `later`'s (a reader that lags gets them as one item)."""
        alternatives = None if self.alternatives is None else self.alternatives + (later.alternatives or [])
        return Tokens(self.ids + later.ids, self.logprobs + later.logprobs, alternatives)


class Outbox(Protocol):
    """Where the loop leaves a request's `Tokens` (or the error that ended it) for its reader."""

    def put(self, item: Tokens | BaseException) -> bool:
        """Leave `item` without blocking; False when nobody will ever read it."""
        ...


@dataclass(eq=False)
class RequestState:
    """What the loop keeps per request beside its `Sequence`."""

    request: CompletionParams
    sampler: Sampler
    mailbox: Outbox
    top_logprobs: int = 0  # likeliest alternatives reported beside each token (OpenAI's top_logprobs)


class Handle:
    """The reader's side of a submitted request: its mailbox, and a way to abort it."""

    def __init__(self, engine: Engine, seq: Sequence) -> None:
        self.mailbox = seq.state.mailbox
        self.request: CompletionParams = seq.state.request
        self.deadline = seq.deadline
        self._abort = lambda: engine.abort(seq)

    def abort(self) -> None:
        """Stop the request at the next step (idempotent; nothing happens once it has finished)."""
        self._abort()


class Engine:
    """The loop that owns `model`; see the module's docstring."""

    def __init__(self, model: CausalLM, settings: EngineSettings, compile_now: bool = False) -> None:
        self.model = model
        self.max_seq_len = min(settings.max_seq_len, model.config.max_position_embeddings)
        self.settings = settings
        self.eos_ids = frozenset(model.config.eos_token_ids)
        graphs = settings.cuda_graphs and model.lm_head.weight.device.type == "cuda"
        self.compiler = None
        if compile_now or (settings.background_compile and not graphs):  # graphs replace the unasked compile
            self.compiler = BackgroundCompile(model, self.max_seq_len, after_tokens=0 if compile_now else COMPILE_AFTER_TOKENS)
        pool_rows = settings.max_batch_size  # the memory bound the user set; rows are zeroed once used
        self.runner = ModelRunner(model, pool_rows, self.max_seq_len, self.compiler, cuda_graphs=graphs)
        chunk = min(settings.prefill_chunk, self.max_seq_len)
        offline_chunk = min(max(chunk, OFFLINE_CHUNK), self.max_seq_len)
        self.scheduler = Scheduler(settings.max_batch_size, chunk, self.runner.move_row, pool_rows, offline_chunk)
        self.steps = 0  # forward passes run, for tests and statistics
        self._inbox: list[Sequence] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def kv_cache_bytes(self) -> int:
        return self.runner.cache.nbytes

    def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        """Refuse, before any work, a request that cannot fit one row of the pool."""
        if prompt_len == 0:
            raise InvalidParameterError("the prompt must have at least one token")
        if prompt_len + max_new_tokens > self.max_seq_len:
            context = self.model.config.max_position_embeddings
            limit = (
                f"the model's context of {context} tokens"
                if self.max_seq_len == context
                else f"the engine's longest sequence of {self.max_seq_len} tokens (the model's context is "
                f"{context}; raise it with configure(max_seq_len=...) or NANOENGINE_MAX_SEQ_LEN)"
            )
            raise InvalidParameterError(
                f"prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) exceeds {limit}"
            )

    def submit(
        self, request: CompletionParams, prompt_ids: list[int], deadline: float, mailbox: Outbox,
        live: bool = True, top_logprobs: int = 0,
    ) -> Handle:  # fmt: skip
        """Queue a request (checked, tokenized); its tokens arrive in `mailbox`. `live=False` marks
        offline batch work, run at full width (`scheduler.py`); `top_logprobs` asks for each
        token's likeliest alternatives, taken from the logits it was sampled from."""
        self.check_length(len(prompt_ids), request.max_new_tokens)
        sampler = Sampler(SamplingParams.of(request), self.model.config.vocab_size, self.runner.device)
        state = RequestState(request, sampler, mailbox, top_logprobs)
        seq = Sequence(prompt_ids, request.max_new_tokens, deadline, state, live=live)
        with self._wake:
            if self._stopping:
                raise RuntimeError("the engine has stopped (the interpreter is exiting)")
            self._inbox.append(seq)
            self._start()
            self._wake.notify()
        return Handle(self, seq)

    def abort(self, seq: Sequence) -> None:
        with self._wake:
            seq.aborted = True
            self._wake.notify()

    @property
    def active_requests(self) -> int:
        with self._wake:
            return len(self._inbox) + len(self.scheduler)

    def stop(self, join_seconds: float = EXIT_JOIN_SECONDS) -> None:
        """End the loop (its requests fail) and wait for it to leave torch."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(join_seconds)
            if self._thread.is_alive():
                logger.warning("the nanoengine loop did not stop within %.0f s", join_seconds)
        if self.compiler is not None:
            self.compiler.stop()

    # --- the loop -----------------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="nanoengine-engine", daemon=True)
            _track(self)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._stopping or self._inbox or len(self.scheduler))
                if self._stopping:
                    break
                for seq in self._inbox:
                    self.scheduler.add(seq)
                self._inbox.clear()
            try:
                self.step()
            except Exception as err:  # a bug or a broken model: fail what runs, keep serving
                logger.exception("engine step failed")
                self._fail_all(err)
        self._fail_all(RuntimeError("the engine stopped"))

    def step(self) -> None:
        """One step: drop and time out, decode, prefill, hand out, free."""
        self._drop_aborted_and_late()
        if self.scheduler.decoding:
            rows = list(self.scheduler.decoding)
            logits = self.runner.decode(rows, self.scheduler.next_row_pos)  # (B, V)
            self.steps += 1
            for seq in rows:
                seq.pos += 1
            self._sampled(rows, logits)
        batch = self.scheduler.next_prefill()
        if batch is not None:
            self._prefill(batch)

    def _prefill(self, batch: PrefillBatch) -> None:
        logits = self.runner.prefill(batch)  # (B, V)
        self.steps += 1
        for seq, chunk in zip(batch.sequences, batch.chunks):
            seq.pos += len(chunk)
        self.scheduler.prefill_done(batch)
        done = [b for b, seq in enumerate(batch.sequences) if seq.prefilled]
        if done:
            self._sampled([batch.sequences[b] for b in done], logits[done])

    def _sampled(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """Sample a token for each row, hand it out, and free the rows that finished."""
        tokens, logprobs = sample([seq.state.sampler for seq in rows], logits)
        alternatives = top_alternatives(logits, [seq.state.top_logprobs for seq in rows])  # None unless asked
        for b, (seq, token, logprob) in enumerate(zip(rows, tokens.tolist(), logprobs.tolist())):
            seq.next_token, seq.generated = token, seq.generated + 1
            finished = token in self.eos_ids or seq.generated == seq.max_new_tokens
            top = [alternatives[b]] if alternatives is not None and seq.state.top_logprobs else None
            self._deliver(seq, Tokens([token], [logprob], top), finished)

    def _deliver(self, seq: Sequence, item: Tokens | BaseException, finished: bool) -> None:
        if not seq.state.mailbox.put(item) or finished:  # nobody reads it any more, or it is done
            self.scheduler.remove(seq)

    def _drop_aborted_and_late(self) -> None:
        now = time.monotonic()
        for seq in self.scheduler:
            if seq.aborted:
                self.scheduler.remove(seq)
            elif now >= seq.deadline:
                doing = "generating" if seq.prefilled else "waiting for the model"
                late = RequestTimeoutError.ran_out(seq.state.request.timeout, seq.generated, seq.max_new_tokens, doing)
                self._deliver(seq, late, finished=True)

    def _fail_all(self, err: BaseException) -> None:
        with self._wake:
            pending, self._inbox = list(self.scheduler) + self._inbox, []
        for seq in pending:
            if seq in self.scheduler:
                self.scheduler.remove(seq)
            seq.state.mailbox.put(err)


_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_atexit_registered = False


def _track(engine: Engine) -> None:
    global _atexit_registered
    _engines.add(engine)
    if not _atexit_registered:
        atexit.register(stop_engines)
        _atexit_registered = True


def stop_engines(join_seconds: float = EXIT_JOIN_SECONDS) -> None:
    """Stop every engine's loop and wait for it to leave torch.

    Registered to run at interpreter exit: a thread still inside torch while the interpreter
    finalizes can abort the whole process.
    """
    for engine in list(_engines):
        engine.stop(join_seconds)

