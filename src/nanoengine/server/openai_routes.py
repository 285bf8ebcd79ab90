"""OpenAI-compatible routes on `nanoengine serve`, for the official `openai` client and the tools built on it.

`POST /v1/completions`, `POST /v1/chat/completions` (JSON, or server-sent events ending in
`data: [DONE]`) and `GET /v1/models`, beside LLM Engine's routes and over the same engine as
`Completion.acreate`. A request for `n` samples of several prompts runs them as concurrent
requests, which the engine batches; `echo` scores the prompts in one batched pass. Errors have
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and
the server's API key is expected as `Authorization: Bearer KEY`.

Imported only by `app.create_app`, once FastAPI is known to be installed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from ..api.outputs import AsyncCompletionStream
from .openai_errors import OpenAIError, as_openai_error
from .openai_schema import OpenAIJob
from .common import (
    ClientGone, InFlight, RequestRecord, ServerSettings, event_stream_response_class, key_matches, read_json,
    unless_disconnected,
)  # fmt: skip


def openai_router(settings: ServerSettings, in_flight: InFlight) -> APIRouter:
    """The OpenAI-style routes of one server."""
    router = APIRouter(prefix="/v1")
    event_stream = event_stream_response_class()

    @router.get("/models")
    async def list_models(request: Request) -> Response:
        try:
            check_bearer(request, settings.api_key)
        except OpenAIError as err:
            return err.response()
        return JSONResponse({"object": "list", "data": [model_card(name) for name in settings.models]})

    @router.get("/models/{name}")
    async def get_model(request: Request, name: str) -> Response:
        try:
            check_bearer(request, settings.api_key)
            served(settings, name)
        except OpenAIError as err:
            return err.response()
        return JSONResponse(model_card(name))

    async def answer(request: Request, kind: str) -> Response:
        record = RequestRecord(f"openai-{kind}", None, in_flight)
        streaming = False
        try:
            check_bearer(request, settings.api_key)
            body = await read_json(request, settings.max_body_bytes)
            record.model = body.get("model")
            target = served(settings, body.get("model"))
            job = await OpenAIJob.build(kind, body, target, settings.request_timeout)
            if job.stream:
                streams = await job.open_streams()
                streaming = True
                return event_stream(EventStream(job, streams, record), record)
            choices, echoed = await unless_disconnected(request, job.run())
            record.tokens, record.outcome = sum(c.num_completion_tokens for c in choices), "200"
            return JSONResponse(job.response(choices, echoed))
        except ClientGone:
            return Response(status_code=499)
        except Exception as err:
            record.fail(err)
            return as_openai_error(err).response()
        finally:
            if not streaming:
                record.finish()

    @router.post("/completions")
    async def completions(request: Request) -> Response:
        return await answer(request, "completions")

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await answer(request, "chat")

    return router


def check_bearer(request: Request, api_key: str | None) -> None:
    """401 unless the key comes as `Authorization: Bearer KEY` (or header `x-api-key`)."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    offered = [credentials.strip() if scheme.lower() == "bearer" else "", request.headers.get("x-api-key", "")]
    if not key_matches(offered, api_key):
        raise OpenAIError(401, "a valid API key is required: Authorization: Bearer KEY", code="invalid_api_key")


def served(settings: ServerSettings, name: Any) -> str:
    """The registered name or folder behind a served model name."""
    if not isinstance(name, str) or not name:
        raise OpenAIError(400, f"model is required; this server serves: {', '.join(settings.models)}", "model")
    if name not in settings.models:
        raise OpenAIError(
            404, f"the model {name!r} does not exist; this server serves: {', '.join(settings.models)}",
            "model", "model_not_found",
        )  # fmt: skip
    return settings.models[name]


def model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "nanoengine"}


class EventStream:
    """A streamed answer's events; closing it stops every choice's generation, even before the first event."""

    def __init__(self, job: OpenAIJob, streams: list[AsyncCompletionStream], record: RequestRecord) -> None:
        self.streams = streams
        self.events = job.events(streams, record)
        self.started = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> str:
        self.started = True
        return await self.events.__anext__()

    async def aclose(self) -> None:
        await self.events.aclose()
        if not self.started:  # the generator's own clean-up never ran
            await asyncio.gather(*(s.aclose() for s in self.streams), return_exceptions=True)
