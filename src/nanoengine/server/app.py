"""`nanoengine serve`: LLM Engine's v1 REST API over the local `Completion` facade.

Existing code that uses Scale's `llmengine` client runs unchanged against it once
`LLM_ENGINE_BASE_PATH` points here. The wire format is LLM Engine's: completions as JSON or as
server-sent events (`data: {json}` per chunk, no `[DONE]`), errors as `{"detail": ...}` with
400 / 401 / 404 / 500, and once a stream has begun, an error as one last chunk carrying `error`.

Every request runs through `Completion.acreate`, whose token loop lives in a worker thread, so
the event loop never blocks on the model. A client that goes away (a closed stream, a socket
timeout) cancels its request, which stops the generation at the next decode step.

FastAPI and uvicorn come with the optional `server` extra and are imported only here, lazily.
"""

import asyncio
import base64
import binascii
import functools
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..api.completion import AsyncCompletionStream, Completion
from ..errors import InvalidParameterError, NanoEngineError, UnknownModelError
from ..weights.registry import DEFAULT_MODEL, REGISTRY
from ..params import SPECS
from ..api.types import CompletionStreamV1Response, StreamError, StreamErrorContent

if TYPE_CHECKING:  # imported at run time only once a server is built
    import uvicorn
    from fastapi import FastAPI, Request

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5005
DEFAULT_REQUEST_TIMEOUT = 600.0
MAX_BODY_BYTES = 1 << 20  # a prompt filling a 8k-token context is well under 100 kB
DEFAULT_RECEIVE_TIMEOUT = 20.0  # for a whole request to arrive: 1 MB at 50 kB/s
DEFAULT_MAX_CONNECTIONS = 1000
MAX_HEADER_BYTES = 16 << 10  # uvicorn's (h11's) default, said here

# Request body fields handed to `Completion.acreate` (the completion parameters but the model, the
# route's own timeout and the route's choice of stream); other fields are ignored, as LLM Engine does.
COMPLETION_FIELDS = tuple(name for name in SPECS if name not in ("model_name", "model", "timeout", "stream"))
# Fields the client always sends (as null) and that nanoengine cannot honour when set.
UNSUPPORTED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


class ServerSetupError(NanoEngineError):
    """The server cannot start: a missing extra, or a `--models` entry that names nothing."""


@dataclass(frozen=True)
class ServerSettings:
    """What one server serves, and how.

    `models` maps each endpoint name (what clients pass as `model=`) to a registered model name
    or a checkpoint folder.
    """

    models: dict[str, str] = field(default_factory=lambda: {DEFAULT_MODEL: DEFAULT_MODEL})
    api_key: str | None = None
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    max_body_bytes: int = MAX_BODY_BYTES
    receive_timeout: float = DEFAULT_RECEIVE_TIMEOUT  # for a request's headers and body to arrive
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # lowered to fit the open-files limit
    # `Host` names accepted beyond loopback ones ("*": any); None accepts any (`serve` on a
    # non-loopback address without an explicit list).
    allowed_hosts: tuple[str, ...] | None = ()

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ServerSetupError("the API key is empty: give a key, or none to serve without one")


def served_models(specs: list[str] | None) -> dict[str, str]:
    """Endpoint names for `--models` entries: `NAME` (registered), `FOLDER`, or `NAME=TARGET`.

    A folder is served under its own name unless `NAME=` says otherwise; no entries serves the
    default model.
    """
    return dict(served_model(spec) for spec in specs or [DEFAULT_MODEL])


def served_model(spec: str) -> tuple[str, str]:
    """(endpoint name, registered name or absolute folder) for one `--models` entry."""
    if spec in REGISTRY or is_folder(spec):
        name, target = "", spec
    else:
        name, equals, target = spec.partition("=")  # a name has no "="; a folder's path may
        if not equals:
            name, target = "", spec
    if target in REGISTRY:
        return name or target, target
    folder = Path(target).expanduser()
    if not is_folder(target):
        raise ServerSetupError(
            f"--models {spec!r}: not a registered model ({', '.join(REGISTRY)}) nor a checkpoint folder"
        )
    return name or folder.resolve().name, str(folder.resolve())


def is_folder(path: str) -> bool:
    try:
        return Path(path).expanduser().is_dir()
    except OSError:  # e.g. a name too long for a path
        return False


class ApiError(Exception):
    """An error answered as `{"detail": ...}` with an HTTP status."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def error_status(err: BaseException) -> tuple[int, str]:
    """The HTTP status and message that an error is answered with."""
    if isinstance(err, ApiError):
        return err.status, err.detail
    if isinstance(err, ClientGone):
        return 499, str(err)  # nobody reads it; nginx's "client closed request"
    if isinstance(err, UnknownModelError):
        return 404, str(err)
    if isinstance(err, InvalidParameterError):
        return 400, str(err)
    if isinstance(err, (NanoEngineError, TimeoutError)):
        return 500, str(err)
    return 500, f"internal error: {type(err).__name__}: {err}"


@dataclass
class InFlight:
    """How many requests one server is answering now (for `/healthz`)."""

    requests: int = 0


class RequestRecord:
    """One request's log line: request id, model, tokens, duration and outcome."""

    def __init__(self, kind: str, model: str | None, in_flight: InFlight) -> None:
        self.kind, self.model, self.in_flight = kind, model, in_flight
        self.request_id = "-"  # the response's request_id, once there is one
        self.tokens: int | None = None
        self.outcome = "disconnected"  # unless the request ends otherwise (also when the client left)
        self.start = time.monotonic()
        self.quiet = False  # logged at DEBUG only: a connection the server closed and reported
        in_flight.requests += 1

    def fail(self, err: BaseException) -> tuple[int, str]:
        status, message = error_status(err)
        if isinstance(err, ClientGone):  # not an error: the finishing line says "disconnected"
            self.quiet = err.quiet
            return status, message
        self.outcome = f"{status} {message}"
        if status == 500 and not isinstance(err, (NanoEngineError, TimeoutError)):
            logger.error("%s %s failed", self.request_id, self.kind, exc_info=err)
        return status, message

    def finish(self) -> None:
        self.in_flight.requests -= 1
        tokens = "-" if self.tokens is None else self.tokens
        duration = time.monotonic() - self.start
        logger.log(
            logging.DEBUG if self.quiet else logging.INFO,
            "%s %s model=%s tokens=%s %.2fs %s", self.request_id, self.kind, self.model, tokens, duration, self.outcome,
        )  # fmt: skip


def create_app(settings: ServerSettings) -> "FastAPI":
    """The ASGI app: LLM Engine's completion and model-endpoint routes, plus `/healthz`."""
    try:
        from fastapi import APIRouter, Depends, FastAPI, Request, Response
        from fastapi.responses import JSONResponse

        from .guard import RequestGuard
    except ImportError as err:
        raise ServerSetupError("the server needs its extra: pip install 'nanoengine[server]'") from err
    app = FastAPI(title="nanoengine", version=version(), docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, allowed_hosts=settings.allowed_hosts)
    in_flight = InFlight()
    event_stream = event_stream_response_class()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> Response:
        return JSONResponse({"detail": err.detail}, status_code=err.status)

    @app.get("/healthz")
    @app.get("/healthcheck")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "active_requests": in_flight.requests}

    async def authorized(request: Request) -> None:
        check_key(request, settings.api_key)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorized)])
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    v1 = APIRouter(prefix="/v1/llm", dependencies=[Depends(authorized)])

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
        stream = None
        try:
            kwargs = await completion_kwargs(request, settings)
            stream = await Completion.acreate(**kwargs, stream=True)
        except Exception as err:
            status, message = record.fail(err)
            return JSONResponse({"detail": message}, status_code=status)
        finally:
            if stream is None:
                record.finish()
        record.request_id = stream.request_id
        return event_stream(server_sent_events(stream, record), media_type="text/event-stream")

    app.include_router(v1)
    from .openai_routes import openai_router  # the OpenAI-style routes: /v1/completions, /v1/chat/completions, /v1/models

    app.include_router(openai_router(settings, in_flight))
    return app


@functools.cache
def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("nanoengine")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def check_key(request: "Request", api_key: str | None) -> None:
    """401 unless the key comes as header `x-api-key` or as basic-auth user (the client sends both)."""
    if api_key is None:
        return
    offered = [request.headers.get("x-api-key", "")]
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            offered.append(base64.b64decode(credentials, validate=True).decode().partition(":")[0])
        except (binascii.Error, UnicodeDecodeError):
            pass
    if not any(secrets.compare_digest(key.encode(), api_key.encode()) for key in offered):
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


async def completion_kwargs(request: "Request", settings: ServerSettings) -> dict[str, Any]:
    """`Completion.acreate` arguments for a completion request (its query and JSON body)."""
    target = served_target(settings, request.query_params.get("model_endpoint_name"))
    body = await read_json(request, settings.max_body_bytes)
    for name in UNSUPPORTED_FIELDS:
        if body.get(name) is not None:
            raise ApiError(400, f"{name} is not supported by nanoengine")
    fields = {name: body[name] for name in COMPLETION_FIELDS if name in body}
    return {"model_name": target, "timeout": settings.request_timeout, **fields}


async def read_json(request: "Request", limit: int) -> dict[str, Any]:
    """The body as a JSON object: 413 past `limit` bytes (read no further), 400 if not JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes")
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is larger than {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        from .guard import CLOSED_BY_SERVER

        closed = request.scope.get("state", {}).get(CLOSED_BY_SERVER)  # and reported, once per interval
        raise ClientGone(closed or "the client disconnected while sending its request", quiet=bool(closed)) from None
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    return body


class ClientGone(Exception):
    """The client disconnected before its answer was ready (`quiet`: the server closed it, and said so)."""

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


async def unless_disconnected(request: "Request", work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so its generation) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # let it stop its worker
    if task.cancelled():
        raise ClientGone("the client disconnected")
    return task.result()


async def wait_for_disconnect(request: "Request") -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
        record.finish()


def error_chunk(request_id: str, status: int, message: str) -> CompletionStreamV1Response:
    timestamp = datetime.now(timezone.utc).isoformat()
    error = StreamError(status_code=status, content=StreamErrorContent(error=message, timestamp=timestamp))
    return CompletionStreamV1Response(request_id=request_id, output=None, error=error)


def event_stream_response_class() -> type:
    """A streaming response that always closes its body generator, however the sending ended.

    (Depending on the ASGI server, Starlette may just stop iterating when the client leaves.)
    """
    from starlette.responses import StreamingResponse

    class EventStreamResponse(StreamingResponse):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                await self.body_iterator.aclose()  # type: ignore[attr-defined]

    return EventStreamResponse


def preload(settings: ServerSettings) -> None:
    """Load (and, for a registered model, fetch) every served model before taking requests."""
    from ..api.models import get_model

    for name, target in settings.models.items():
        logger.info("loading %s (%s)", name, target)
        get_model(target)


def serve(settings: ServerSettings, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Run the server until Ctrl-C / SIGTERM; in-flight requests get 5 s to finish, then are cancelled."""
    server = uvicorn_server(settings, host, port)
    from .guard import is_loopback_address

    if settings.api_key is None and not is_loopback_address(host):
        logger.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    server.run()


def uvicorn_server(settings: ServerSettings, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> "uvicorn.Server":
    """The uvicorn server for `settings`, with the limits of `server_guard` (see there why)."""
    try:
        import uvicorn

        from .guard import connection_limits, guarded_protocol
        from .guard import is_loopback_address, throttle_noisy_logs
    except ImportError as err:
        raise ServerSetupError("the server needs its extra: pip install 'nanoengine[server]'") from err
    loopback = is_loopback_address(host)
    if not loopback and settings.allowed_hosts == ():
        settings = replace(settings, allowed_hosts=None)  # reachable by other names by intent
    limits = connection_limits(settings.receive_timeout, settings.max_connections)
    logger.info(
        "at most %d connections, accepted %d at a time; a request must arrive within %g s",
        limits.max_connections, limits.backlog, limits.receive_timeout,
    )  # fmt: skip
    throttle_noisy_logs()
    config = uvicorn.Config(
        create_app(settings), host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=5,
        http=guarded_protocol(limits), h11_max_incomplete_event_size=MAX_HEADER_BYTES, backlog=limits.backlog,
    )  # fmt: skip
    return uvicorn.Server(config)
