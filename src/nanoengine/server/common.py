"""What every route of `nanoengine serve` shares: the settings, the served models, errors and their
statuses, the request's log line, reading a body, and noticing a client that left.

Free of FastAPI at import time: the server's modules import it only once a server is built.
"""

import asyncio
import functools
import json
import logging
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import InvalidParameterError, NanoEngineError, UnknownModelError
from ..weights.registry import DEFAULT_MODEL, REGISTRY

if TYPE_CHECKING:
    from fastapi import Request

logger = logging.getLogger("nanoengine.server")
T = TypeVar("T")

DEFAULT_REQUEST_TIMEOUT = 600.0


MAX_BODY_BYTES = 1 << 20  # a prompt filling a 8k-token context is well under 100 kB


DEFAULT_RECEIVE_TIMEOUT = 20.0  # for a whole request to arrive: 1 MB at 50 kB/s


DEFAULT_MAX_CONNECTIONS = 1000



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



class ClientGone(Exception):
    """The client disconnected before its answer was ready (`quiet`: the server closed it, and said so)."""

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet



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



@functools.cache
def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("nanoengine")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"



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



def event_stream_response_class() -> type:
    """A streaming response that always closes its body generator, however the sending ended, and
    then finishes the request's record: the one place a streamed request's log line is written.

    (Depending on the ASGI server, Starlette may just stop iterating when the client leaves.)
    """
    from starlette.responses import StreamingResponse

    class EventStreamResponse(StreamingResponse):
        def __init__(self, content: Any, record: RequestRecord, **kwargs: Any) -> None:
            super().__init__(content, media_type="text/event-stream", **kwargs)
            self.record = record

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                try:
                    await self.body_iterator.aclose()  # type: ignore[attr-defined]
                finally:
                    self.record.finish()

    return EventStreamResponse


def key_matches(offered: list[str], api_key: str | None) -> bool:
    """Whether a key the client offered is the server's (in constant time); any will do without a key."""
    return api_key is None or any(secrets.compare_digest(key.encode(), api_key.encode()) for key in offered)
