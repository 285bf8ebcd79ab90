"""LLM Engine's v1 routes: model endpoints, `completions-sync` and `completions-stream`.

Existing code that uses Scale's `llmengine` client runs unchanged against them once
`LLM_ENGINE_BASE_PATH` points here. The wire format is LLM Engine's: completions as JSON or as
server-sent events (`data: {json}` per chunk, no `[DONE]`), errors as `{"detail": ...}` with
400 / 401 / 404 / 500, and once a stream has begun, an error as one last chunk carrying `error`.

Every request runs through `Completion.acreate`, whose token loop lives in the engine's thread,
so the event loop never blocks on the model. A client that goes away (a closed stream, a socket
timeout) cancels its request, which stops the generation at the next decode step.

Imported only by `app.create_app`, once FastAPI is known to be installed.
"""

import base64
import binascii
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from ..api.completion import Completion
from ..api.outputs import AsyncCompletionStream
from ..api.types import CompletionStreamV1Response, StreamError, StreamErrorContent
from ..params import SPECS
from .common import (
    ApiError, ClientGone, InFlight, RequestRecord, ServerSettings, event_stream_response_class, key_matches, read_json,
    unless_disconnected, version,
)  # fmt: skip

# Request body fields handed to `Completion.acreate` (the completion parameters but the model, the
# route's own timeout and the route's choice of stream); other fields are ignored, as LLM Engine does.
COMPLETION_FIELDS = tuple(name for name in SPECS if name not in ("model_name", "model", "timeout", "stream"))


# Fields the client always sends (as null) and that nanoengine cannot honour when set.
UNSUPPORTED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def llmengine_router(settings: ServerSettings, in_flight: InFlight) -> APIRouter:
    """LLM Engine's routes of one server, under `/v1/llm`, behind its API key."""

    async def authorized(request: Request) -> None:
        check_key(request, settings.api_key)

    v1 = APIRouter(prefix="/v1/llm", dependencies=[Depends(authorized)])
    event_stream = event_stream_response_class()

    @v1.get("/model-endpoints")
    async def list_endpoints() -> dict[str, Any]:
        return {"model_endpoints": [endpoint_description(name) for name in settings.models]}

    @v1.get("/model-endpoints/{name}")
    async def get_endpoint(name: str) -> dict[str, Any]:
        served_target(settings, name)
        return endpoint_description(name)

    @v1.post("/completions-sync")
    async def completions_sync(request: Request) -> Response:
        record = RequestRecord("sync", request.query_params.get("model_endpoint_name"), in_flight)
        try:
            kwargs = await completion_kwargs(request, settings)
            response = await unless_disconnected(request, Completion.acreate(**kwargs, stream=False))
            record.request_id, record.tokens = response.request_id, response.output.num_completion_tokens
            record.outcome = "200"
            return JSONResponse(response.dict())
        except ClientGone as gone:
            record.fail(gone)
            return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
        except Exception as err:
            status, message = record.fail(err)
            return JSONResponse({"detail": message}, status_code=status)
        finally:
            record.finish()

    @v1.post("/completions-stream")
    async def completions_stream(request: Request) -> Response:
        record = RequestRecord("stream", request.query_params.get("model_endpoint_name"), in_flight)
        try:
            kwargs = await completion_kwargs(request, settings)
            stream = await Completion.acreate(**kwargs, stream=True)
        except Exception as err:
            status, message = record.fail(err)
            record.finish()
            return JSONResponse({"detail": message}, status_code=status)
        record.request_id = stream.request_id
        return event_stream(server_sent_events(stream, record), record)

    return v1


def check_key(request: Request, api_key: str | None) -> None:
    """401 unless the key comes as header `x-api-key` or as basic-auth user (the client sends both)."""
    offered = [request.headers.get("x-api-key", "")]
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            offered.append(base64.b64decode(credentials, validate=True).decode().partition(":")[0])
        except (binascii.Error, UnicodeDecodeError):
            pass
    if not key_matches(offered, api_key):
        raise ApiError(401, "a valid API key is required (header x-api-key, or basic auth user name)")


def served_target(settings: ServerSettings, name: str | None) -> str:
    """The registered name or folder behind an endpoint name; 404 for a name not served."""
    if not name:
        raise ApiError(400, "the query parameter model_endpoint_name is required")
    if name not in settings.models:
        raise ApiError(404, f"unknown model endpoint {name!r}; this server serves: {', '.join(settings.models)}")
    return settings.models[name]



def endpoint_description(name: str) -> dict[str, Any]:
    """A model in the shape of LLM Engine's `GetLLMEndpointResponse`.

    The client accepts only its own enum values for `inference_framework`, so nanoengine names
    the one whose request semantics it follows (vLLM's) and tells itself apart in the tag.
    """
    return {
        "id": name,
        "name": name,
        "model_name": name,
        "source": "hugging_face",
        "status": "READY",
        "inference_framework": "vllm",
        "inference_framework_tag": f"nanoengine-{version()}",
        "num_shards": 1,
        "quantize": None,
        "spec": None,
    }



async def completion_kwargs(request: Request, settings: ServerSettings) -> dict[str, Any]:
    """`Completion.acreate` arguments for a completion request (its query and JSON body)."""
    target = served_target(settings, request.query_params.get("model_endpoint_name"))
    body = await read_json(request, settings.max_body_bytes)
    for name in UNSUPPORTED_FIELDS:
        if body.get(name) is not None:
            raise ApiError(400, f"{name} is not supported by nanoengine")
    fields = {name: body[name] for name in COMPLETION_FIELDS if name in body}
    return {"model_name": target, "timeout": settings.request_timeout, **fields}



async def server_sent_events(stream: AsyncCompletionStream, record: RequestRecord) -> AsyncIterator[str]:
    """One `data: {json}` event per chunk; a failure after the start is one last error chunk.

    Closing this generator (the client left) closes the stream, which stops its generation.
    """
    try:
        async for chunk in stream:
            record.tokens = chunk.output.num_completion_tokens
            yield f"data: {chunk.json()}\n\n"
        record.outcome = "200"
    except Exception as err:
        status, message = record.fail(err)
        yield f"data: {error_chunk(stream.request_id, status, message).json()}\n\n"
    finally:
        await stream.aclose()



def error_chunk(request_id: str, status: int, message: str) -> CompletionStreamV1Response:
    timestamp = datetime.now(timezone.utc).isoformat()
    error = StreamError(status_code=status, content=StreamErrorContent(error=message, timestamp=timestamp))
    return CompletionStreamV1Response(request_id=request_id, output=None, error=error)
