"""`nanoengine.load()`: one handle on a loaded model, for research, teaching and batch work.

The handle is shared with `Completion` (the same per-process cache): `llm.model` is the torch
module, `llm.tokenizer` the checkpoint's tokenizer, and the methods run on the model's engine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .models import LoadedModel, get_model
from .types import CompletionOutput, CompletionStreamOutput


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

    def complete(
        self, prompt: str, stream: bool = False, **sampling: Any
    ) -> CompletionOutput | Iterator[CompletionStreamOutput]:
        """One completion of `prompt`; `sampling` takes `Completion.create`'s parameters."""
        from .completion import Completion

        sampling.setdefault("timeout", 600)
        response = Completion.create(model_name=self.folder, prompt=prompt, stream=stream, **sampling)
        if stream:
            return (chunk.output for chunk in response)
        return response.output

    def chat(
        self, messages: list[dict[str, str]], stream: bool = False, **sampling: Any
    ) -> CompletionOutput | Iterator[CompletionStreamOutput]:
        """The assistant's answer to `messages` (`{"role", "content"}` dicts), via the checkpoint's chat template."""
        from .chat import chat

        return chat(self, messages, stream=stream, **sampling)

    def trace(self, prompt: str | list[int], interventions: dict[str, Any] | None = None):
        """One forward pass with every activation kept: hidden states, attentions, logits, logit lens."""
        from .tracing import trace

        return trace(self, prompt, interventions)

    def score(self, texts: list[str]):
        """Per text: its tokens, each token's log-probability given those before it, sum, perplexity."""
        from .scoring import score

        return score(self, texts)

    def __repr__(self) -> str:
        return f"LLM({str(self.folder)!r})"


def load(name_or_path: str | os.PathLike) -> LLM:
    """The handle on a registered model or checkpoint folder, loading (and fetching) it on first use."""
    return LLM(get_model(name_or_path))
