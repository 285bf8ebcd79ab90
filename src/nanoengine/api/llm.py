"""`nanoengine.load()`: one handle on a loaded model, for research, teaching and batch work.

The handle is shared with `Completion` (the same per-process cache): `llm.model` is the torch
module, `llm.tokenizer` the checkpoint's tokenizer, and the methods run on the model's engine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .completion import submit
from .offline import run_batch, with_progress
from .outputs import CompletionStream, collect
from ..engine.loop import Engine
from ..errors import InvalidParameterError
from .models import LoadedModel, get_model
from ..params import NO_TIMEOUT, SAMPLING_NAMES, CompletionParams, seed_for
from .types import CompletionOutput, CompletionStreamOutput

logger = logging.getLogger(__name__)



class LLM:
    """A loaded model and what can be done with it (see `../shared/API.md`)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self._loaded = loaded

    @property
    def folder(self) -> Path:
        return self._loaded.folder

    @property
    def model(self):
        """The torch module (`CausalLM` or a family's subclass), for experiments."""
        return self._loaded.model

    @property
    def tokenizer(self):
        return self._loaded.tokenizer

    @property
    def engine(self) -> Engine:
        """The loop that runs this model's requests (shared with `Completion`)."""
        return self._loaded.engine

    def complete(
        self, prompt: str, stream: bool = False, **sampling: Any
    ) -> CompletionOutput | Iterator[CompletionStreamOutput]:
        """One completion of `prompt`; `sampling` takes `CompletionParams`' fields (the
        timeout defaults to none)."""
        request = self._request(prompt, sampling)
        chunks = CompletionStream("", *submit(request, self._loaded, self.tokenizer.encode(request.prompt)))
        if stream:
            return chunks.outputs()
        with chunks:
            return collect(request, chunks.outputs())

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        interventions: dict[str, Callable] | None = None,
        progress: bool | None = None,
        as_completed: bool = False,
        **sampling: Any,
    ) -> list[CompletionOutput] | Iterator[tuple[int, CompletionOutput]]:
        """Complete every prompt as offline batch work (the engine runs it at full width); the
        outputs come back in the order of the prompts, or with `as_completed=True` as an iterator
        of (prompt index, output) in the order they finish (closing it stops the rest).

        `sampling` takes `CompletionParams`' fields (the timeout, for the whole call,
        defaults to none). With a `seed`, prompt i is sampled with seed + i, so that each prompt
        has its own reproducible stream. Every parameter and prompt is checked before any work.
        `interventions` (see `tracing.intervene`) apply to every forward pass while the call runs:
        to every request the model serves meanwhile, too. `progress` shows a bar of prompts done
        and tokens/s (default: 16 prompts or more, on a terminal).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seed = sampling.pop("seed", None)
        requests = [
            self._request(prompt, {**sampling, "seed": None if seed is None else seed_for(seed, i)})
            for i, prompt in enumerate(prompts)
        ]
        prompt_ids = [self.tokenizer.encode(request.prompt) for request in requests]
        for request, ids in zip(requests, prompt_ids):
            self.engine.check_length(len(ids), request.max_new_tokens)
        results = _batch_results(self._loaded, requests, prompt_ids, interventions, progress)
        if as_completed:
            return results
        outputs: list[CompletionOutput | None] = [None] * len(prompts)
        for index, output in results:
            outputs[index] = output
        return outputs

    def _request(self, prompt: str, sampling: dict[str, Any]) -> CompletionParams:
        unknown = set(sampling) - set(SAMPLING_NAMES)
        if unknown:
            raise InvalidParameterError(
                f"unknown parameter(s) {', '.join(sorted(unknown))}; known: {', '.join(SAMPLING_NAMES)}"
            )
        return CompletionParams(model_name=self.folder, prompt=prompt, **{"timeout": NO_TIMEOUT, **sampling})

    def chat(
        self, messages: list[dict[str, str]], stream: bool = False, **sampling: Any
    ) -> CompletionOutput | Iterator[CompletionStreamOutput]:
        """The assistant's answer to `messages` (`{"role", "content"}` dicts), via the checkpoint's chat template."""
        from .chat import chat_prompt

        return self.complete(chat_prompt(self.tokenizer, messages), stream=stream, **sampling)

    def trace(self, prompt: str | list[int], interventions: dict[str, Any] | None = None):
        """One forward pass with every activation kept: hidden states, attentions, logits, logit lens."""
        from ..research.tracing import trace

        return trace(self, prompt, interventions)

    def score(self, texts: list[str]):
        """Per text: its tokens, each token's log-probability given those before it, sum, perplexity."""
        from ..research.scoring import score

        return score(self, texts)

    def run_batch(
        self, input_path: str | os.PathLike, output_path: str | os.PathLike, *, score: bool = False, **options: Any
    ):
        """Answer a JSONL file of requests (OpenAI's batch format, or `{"prompt": ...}` lines) into
        `output_path`, one line each as it finishes; a rerun resumes where a crash left off.
        `score` scores each line's text instead. See `batch/job.py`'s `run_batch` for the options."""
        from ..batch.job import run_batch  # the job (and its OpenAI lines) lives above the request side

        return run_batch(self, input_path, output_path, score=score, **options)

    def __repr__(self) -> str:
        return f"LLM({str(self.folder)!r})"


def load(name_or_path: str | os.PathLike) -> LLM:
    """The handle on a registered model or checkpoint folder, loading (and fetching) it on first use."""
    return LLM(get_model(name_or_path))


@contextmanager
def _interventions(engine: Engine, interventions: dict[str, Callable] | None) -> Iterator[None]:
    """Hook the model for the block, and keep the engine on its eager step meanwhile (a compiled
    step does not see hooks)."""
    if not interventions:
        yield
        return
    from ..research.interventions import intervene

    with intervene(engine.model, interventions):
        engine.runner.eager_only += 1
        try:
            yield
        finally:
            engine.runner.eager_only -= 1


def _batch_results(
    loaded: LoadedModel,
    requests: list[CompletionParams],
    prompt_ids: list[list[int]],
    interventions: dict[str, Callable] | None,
    progress: bool | None,
) -> Iterator[tuple[int, CompletionOutput]]:
    """(index, output) as each request finishes, with the interventions held meanwhile."""
    with _interventions(loaded.engine, interventions):
        yield from with_progress(run_batch(loaded, requests, prompt_ids), len(requests), progress)
