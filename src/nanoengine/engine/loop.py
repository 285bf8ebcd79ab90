"""The engine: one loop, in one thread, that owns a loaded model and runs every request on it.

Requests are added (`submit`) and aborted from any thread. Each step of the loop:

1. drops the sequences whose reader left and fails those past their deadline;
2. runs one decode token for every decoding sequence, as one batch (`runner.decode`);
3. prefills new prompts, or the next chunk of a long one, under a per-step token budget
   (`runner.prefill`), so a long prompt delays the others' next token by one chunk at most;
4. samples each row with its own request's parameters (`sampling.sample`), turns the tokens
   into chunks (`outputs.OutputBuilder`) and leaves them in each request's `Mailbox`;
5. frees the rows of the sequences that finished.

The loop never waits for a reader: a slow one finds its text merged into one chunk.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from dataclasses import dataclass

import torch

from .compiling import COMPILE_AFTER_TOKENS, BackgroundCompile
from ..errors import InvalidParameterError
from ..model.decoder import CausalLM
from ..api.outputs import Mailbox, OutputBuilder, ReaderGone, timeout_error
from .runner import ModelRunner
from .sampling import Sampler, sample, top_alternatives
from .scheduler import PrefillBatch, Scheduler, Sequence
from ..model.tokenizer import Tokenizer
from ..api.validation import CompletionRequest

logger = logging.getLogger(__name__)

EXIT_JOIN_SECONDS = 10.0  # at interpreter exit, how long to wait for a loop to leave torch


@dataclass(frozen=True)
class EngineSettings:
    """How an engine is sized: concurrent sequences (rows of the KV pool), the longest sequence
    (prompt plus new tokens) a row holds, and the prompt tokens prefilled per step; and whether
    it compiles its decode step in the background once it has served a while (`compiling.py`)."""

    max_batch_size: int = 16
    max_seq_len: int = 4096
    prefill_chunk: int = 256
    background_compile: bool = True


@dataclass(eq=False)
class RequestState:
    """What the loop keeps per request beside its `Sequence`."""

    request: CompletionRequest
    sampler: Sampler
    output: OutputBuilder
    mailbox: Mailbox


class Handle:
    """The reader's side of a submitted request: its mailbox, and a way to abort it."""

    def __init__(self, engine: Engine, seq: Sequence) -> None:
        self.mailbox: Mailbox = seq.state.mailbox
        self.request: CompletionRequest = seq.state.request
        self.deadline = seq.deadline
        self._abort = lambda: engine.abort(seq)

    def abort(self) -> None:
        """Stop the request at the next step (idempotent; nothing happens once it has finished)."""
        self._abort()


class Engine:
    """The loop that owns `model`; see the module's docstring."""

    def __init__(
        self, model: CausalLM, tokenizer: Tokenizer, settings: EngineSettings, compile_now: bool = False
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_len = min(settings.max_seq_len, model.config.max_position_embeddings)
        self.settings = settings
        self.eos_ids = frozenset(model.config.eos_token_ids)
        self.compiler = None
        if (settings.background_compile or compile_now) and model.decode_step is None:
            self.compiler = BackgroundCompile(model, self.max_seq_len, after_tokens=0 if compile_now else COMPILE_AFTER_TOKENS)
        self.runner = ModelRunner(model, settings.max_batch_size, self.max_seq_len, self.compiler)
        self.scheduler = Scheduler(settings.max_batch_size, min(settings.prefill_chunk, self.max_seq_len), self.runner.move_row)
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

    def submit(self, request: CompletionRequest, prompt_ids: list[int], deadline: float) -> Handle:
        """Queue a request (checked, tokenized); its chunks arrive in the handle's mailbox."""
        self.check_length(len(prompt_ids), request.max_new_tokens)
        device = self.runner.device
        state = RequestState(
            request,
            Sampler(request.sampling, self.model.config.vocab_size, device),
            OutputBuilder(request, self.tokenizer, self.eos_ids, len(prompt_ids)),
            Mailbox(),
        )
        seq = Sequence(prompt_ids, request.max_new_tokens, deadline, state)
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
            logits = self.runner.decode(rows)  # (B, V)
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
        """Sample a token for each row, hand out its chunk, and free the rows that finished."""
        tokens, logprobs = sample([seq.state.sampler for seq in rows], logits)
        alternatives = top_alternatives(logits, [seq.state.request.top_logprobs for seq in rows])  # None unless asked
        for b, (seq, token, logprob) in enumerate(zip(rows, tokens.tolist(), logprobs.tolist())):
            seq.next_token, seq.generated = token, seq.generated + 1
            chunk = seq.state.output.add(token, logprob, alternatives[b] if alternatives else None)
            self._deliver(seq, chunk, finished=chunk.finished)

    def _deliver(self, seq: Sequence, item, finished: bool) -> None:
        try:
            seq.state.mailbox.put(item)
        except ReaderGone:
            finished = True
        if finished:
            self.scheduler.remove(seq)

    def _drop_aborted_and_late(self) -> None:
        now = time.monotonic()
        for seq in self.scheduler:
            if seq.aborted:
                self.scheduler.remove(seq)
            elif now >= seq.deadline:
                doing = "generating" if seq.prefilled else "waiting for the model"
                self._deliver(seq, timeout_error(seq.state.request, seq.generated, doing), finished=True)

    def _fail_all(self, err: BaseException) -> None:
        with self._wake:
            pending, self._inbox = list(self.scheduler) + self._inbox, []
        for seq in pending:
            if seq in self.scheduler:
                self.scheduler.remove(seq)
            try:
                seq.state.mailbox.put(err)
            except ReaderGone:
                pass


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

