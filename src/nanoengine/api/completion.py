"""`Completion`: nanoengine's public face, shaped after `llmengine.Completion`.

One token's path (docs/architecture.md): `Completion.create` checks every parameter
(`CompletionParams`); `submit` gets the loaded model (`models.py`), tokenizes the prompt with the
checkpoint's own tokenizer and hands the request to the model's engine (`engine/loop.py`). The
engine's loop runs the request's tokens in batches with every other request's, picks each with
the request's own sampler (`engine/sampling.py`) and leaves it in the request's mailbox. The
stream (`outputs.py`) turns what it finds there into chunks (whole characters, stop strings held
back) as it reads; a full response is the same chunks joined. `acreate` reads the same mailbox
from asyncio.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

from ..engine.loop import Handle
from ..params import CompletionParams, signature_of
from .models import LoadedModel, get_model
from .outputs import AsyncCompletionStream, CompletionStream, Mailbox, OutputBuilder, NoTokens, collect
from .types import CompletionStreamV1Response, CompletionSyncV1Response


class Completion:
    """Text completion with a local model, called as `llmengine.Completion` is.

    `create` returns a `CompletionSyncV1Response`, or with `stream=True` an iterator of
    `CompletionStreamV1Response` chunks; `acreate` is the same for asyncio. Many threads and
    tasks may call at once: requests to one model are batched by its engine.
    """

    @staticmethod
    @signature_of(CompletionParams)
    def create(*args: Any, **kwargs: Any) -> CompletionSyncV1Response | Iterator[CompletionStreamV1Response]:
        """Complete `prompt` with the model `model_name` (a registered name or a checkpoint folder).

        Takes `CompletionParams`' fields (llmengine's parameters, in its order). `temperature=0`
        is greedy. Generation ends at the earliest of `stop_sequences` (cut from the text unless
        `include_stop_str_in_output`), at an end-of-sequence token, or after `max_new_tokens`.
        `timeout` seconds bound the whole request, waiting for the model to be free included
        (loading it, once per process, is not counted). Every parameter is checked before any
        work; errors derive from `ValueError`, and running out of time raises a `TimeoutError`
        (in a stream: after the chunks so far). A stream that is closed, dropped or left stops at
        the next decode step.
        """
        request = CompletionParams(*args, **kwargs)
        chunks = CompletionStream(str(uuid.uuid4()), *submit(request))
        if request.stream:
            return chunks
        with chunks:
            return CompletionSyncV1Response(chunks.request_id, collect(request, chunks.outputs()))

    @staticmethod
    @signature_of(CompletionParams)
    async def acreate(*args: Any, **kwargs: Any) -> CompletionSyncV1Response | AsyncCompletionStream:
        """`create` for asyncio: awaited to a response, or with `stream=True` to an async iterable.

        Loading and tokenizing run in an executor thread and the forward passes in the engine's,
        so the event loop never blocks; a cancelled task stops its generation at the next step.
        """
        request = CompletionParams(*args, **kwargs)
        loaded, prompt_ids = await asyncio.get_running_loop().run_in_executor(None, prepare, request)
        chunks = AsyncCompletionStream(str(uuid.uuid4()), *submit(request, loaded, prompt_ids))
        if request.stream:
            return chunks
        try:
            outputs = [response.output async for response in chunks]
        finally:
            await chunks.aclose()
        return CompletionSyncV1Response(chunks.request_id, collect(request, outputs))


def prepare(request: CompletionParams) -> tuple[LoadedModel, list[int]]:
    """Get the model (loading it on first use) and tokenize the prompt; check it fits."""
    loaded = get_model(request.model_name)
    prompt_ids = loaded.tokenizer.encode(request.prompt)  # exactly as tokenizer.json says
    loaded.engine.check_length(len(prompt_ids), request.max_new_tokens)
    return loaded, prompt_ids


def submit(
    request: CompletionParams,
    loaded: LoadedModel | None = None,
    prompt_ids: list[int] | None = None,
    live: bool = True,
    top_logprobs: int = 0,
) -> tuple[Handle | NoTokens, CompletionParams, float, OutputBuilder | None]:
    """Hand the request to its model's engine; return what its stream reads: the engine's handle
    (an empty one for zero new tokens), the request, its deadline and its output builder.
    `live=False` marks offline batch work, which the engine runs at full width; `top_logprobs`
    asks for each token's likeliest alternatives (the OpenAI routes).

    The clock of `timeout` starts once the model is loaded: loading (or fetching) happens once
    per process, and a first request should not fail for it. Waiting for a free slot does count.
    """
    if loaded is None or prompt_ids is None:
        loaded, prompt_ids = prepare(request)
    deadline = time.monotonic() + request.timeout
    if request.max_new_tokens == 0:
        return NoTokens(len(prompt_ids)), request, deadline, None
    builder = OutputBuilder(request, loaded.tokenizer, loaded.engine.eos_ids, len(prompt_ids))
    handle = loaded.engine.submit(request, prompt_ids, deadline, Mailbox(), live, top_logprobs)
    return handle, request, deadline, builder
