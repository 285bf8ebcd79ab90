"""What keeps `nanoengine serve` answering when clients are slow, stalled, hostile or browsers.

Connections (an HTTP protocol over uvicorn's h11 one): uvicorn bounds the idle time between
requests, but not the time a client takes to send one: its keep-alive timer restarts on every
byte, so a client that sends half a request and waits holds a connection (and a file descriptor)
for ever, and a few hundred of them exhaust the process. `guarded_protocol` adds

- a receipt deadline: a request's headers and body must arrive within `receive_timeout` seconds
  of its first byte (of the connection's opening, for the first request). It is disarmed once the
  request is whole, so a long streamed answer is unaffected. A late client gets 408 and is closed.
- a cap on open connections, below the process's open-files limit. At the cap, the connection
  that has waited longest for its request is closed to make room (a stalled client, never one
  whose request is being answered); if every connection is busy answering, the newcomer gets 503.
- one log line per interval for closed and refused connections and for malformed requests, never
  one per connection, and none of asyncio's per-attempt tracebacks should the open-files limit be
  reached anyway.

Requests (`RequestGuard`, ASGI middleware): a browser page can post to a local server without a
CORS preflight if the body is not declared JSON, and DNS rebinding lets a page read a loopback
server's answers under a name of its own. So POST bodies must be `application/json` (415
otherwise), and a server bound to loopback accepts only loopback `Host` names unless told others.

uvicorn is imported here; this module is imported only when a server is built.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("nanoengine.server")

LOG_INTERVAL = 10.0  # seconds between two reports of closed or refused connections
LISTEN_BACKLOG = 64  # also the most connections asyncio accepts in one go (lowered when files are few)
OWN_FILES = 64  # descriptors the process keeps for itself: model files, pipes, the listening socket
# Accept batches whose descriptors are open but not counted against the cap. asyncio accepts a batch
# on every loop turn the listening socket is ready; a batch's connections reach `connection_made` two
# turns later, and those they evict release their descriptors one turn after that: three batches at
# the peak (measured: 2.7), one more as margin for a loop slowed by a busy machine.
BATCHES_IN_FLIGHT = 4
CLOSED_BY_SERVER = "nanoengine.closed_by_server"  # set in a request's scope state when closed here
RECEIVING = (h11.IDLE, h11.SEND_BODY)  # the client's h11 states while its request is incomplete
LOOPBACK_NAMES = ("localhost",)  # and any `*.localhost` name, which browsers resolve to loopback
ANY_HOST = "*"


class ThrottledLog:
    """Events reported at most once per `interval`: the first at once, the rest as a count."""

    def __init__(self, message: str, interval: float = LOG_INTERVAL, level: int = logging.INFO) -> None:
        self.message, self.interval, self.level = message, interval, level
        self.pending = 0
        self.last_detail = ""
        self.flush_scheduled = False
        self.last_report = -float("inf")

    def record(self, detail: str) -> None:
        self.pending += 1
        self.last_detail = detail
        if time.monotonic() - self.last_report >= self.interval:
            self.flush()
        elif not self.flush_scheduled:  # the count is reported when the interval ends
            try:
                asyncio.get_running_loop().call_later(self.interval, self.flush)
                self.flush_scheduled = True
            except RuntimeError:  # no event loop here: reported with the next event instead
                pass

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.pending:
            logger.log(self.level, "%s: %d connection(s) (latest: %s)", self.message, self.pending, self.last_detail)
            self.pending = 0
            self.last_report = time.monotonic()


@dataclass(frozen=True)
class ConnectionLimits:
    receive_timeout: float  # seconds a client may take to send one whole request
    max_connections: int  # connections open at once
    backlog: int = LISTEN_BACKLOG  # the listening queue, and so the most connections accepted in one go


def connection_limits(receive_timeout: float, configured: int) -> ConnectionLimits:
    """`configured` connections, lowered (with the accept batch) to stay clear of the open-files limit.

    The soft limit is raised first as far as the hard one allows. Connections, plus the accept
    batches in flight, plus the process's own files must fit under it, or `accept()` fails.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OWN_FILES + configured + BATCHES_IN_FLIGHT * LISTEN_BACKLOG
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return ConnectionLimits(receive_timeout, configured)
    budget = max(soft - OWN_FILES, 2 * BATCHES_IN_FLIGHT)
    backlog = max(1, min(LISTEN_BACKLOG, budget // (2 * BATCHES_IN_FLIGHT)))  # half the budget at most
    connections = max(1, min(configured, budget - BATCHES_IN_FLIGHT * backlog))
    return ConnectionLimits(receive_timeout, connections, backlog)


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a receipt deadline and a connection cap (see the module's doc)."""
    cap = limits.max_connections
    logs = {
        "timeouts": ThrottledLog(f"closed connections that sent no whole request within {limits.receive_timeout:g} s"),
        "evictions": ThrottledLog(f"closed connections still waiting for a request, to stay within {cap} open"),
        "refusals": ThrottledLog(f"refused connections: all {cap} open ones are being answered", level=logging.WARNING),
    }
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits, **logs})


class GuardedH11Protocol(H11Protocol):
    """The protocol's behaviour; `guarded_protocol` makes the class for one server's limits."""

    limits: ConnectionLimits
    timeouts: ThrottledLog
    evictions: ThrottledLog
    refusals: ThrottledLog
    refused = False
    receipt_deadline: asyncio.TimerHandle | None = None
    waiting_since: float | None = None  # while the connection waits for (the rest of) a request

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections and not self.evict_the_longest_waiting():
            self.refused = True
            self.refusals.record(peer(transport))
            transport.write(plain_response(503, "the server has too many open connections; try again later"))
            transport.close()
            return
        super().connection_made(transport)
        self.waiting_since = time.monotonic()
        self.arm_receipt_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm_receipt_deadline()
        if not self.refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state in RECEIVING and self.receipt_deadline is None:
            self.arm_receipt_deadline()  # the first byte of a further request on this connection
        super().data_received(data)
        if self.conn.their_state not in RECEIVING:  # whole: the answer may take as long as it takes
            self.disarm_receipt_deadline()
            self.waiting_since = None

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may go on with a request that came pipelined
        if not self.transport.is_closing() and self.conn.their_state in RECEIVING:
            self.waiting_since = time.monotonic()  # idle until the next request: evictable
            if self.conn.their_state == h11.SEND_BODY and self.receipt_deadline is None:
                self.arm_receipt_deadline()

    def arm_receipt_deadline(self) -> None:
        self.receipt_deadline = self.loop.call_later(self.limits.receive_timeout, self.receipt_too_late)

    def disarm_receipt_deadline(self) -> None:
        if self.receipt_deadline is not None:
            self.receipt_deadline.cancel()
            self.receipt_deadline = None

    def receipt_too_late(self) -> None:
        self.receipt_deadline = None
        self.timeouts.record(peer(self.transport))
        self.close_unanswered(408, f"the request was not received within {self.limits.receive_timeout:g} s")

    def evict_the_longest_waiting(self) -> bool:
        waiting = [c for c in self.connections if getattr(c, "waiting_since", None) is not None]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c.waiting_since)
        self.evictions.record(peer(oldest.transport))
        oldest.close_unanswered(503, "the server has too many open connections; try again later")
        return True

    def close_unanswered(self, status: int, reason: str) -> None:
        """Answer `status` unless an answer has begun, and close: its application sees a disconnect."""
        self.disarm_receipt_deadline()
        self.waiting_since = None
        self.connections.discard(self)  # counted out now; the transport closes on the next turn
        cycle = self.cycle if self.conn.their_state == h11.SEND_BODY else None  # an app awaiting the body
        if cycle is not None:
            cycle.scope.setdefault("state", {})[CLOSED_BY_SERVER] = reason  # type: ignore[typeddict-unknown-key]
            cycle.disconnected = True
            cycle.message_event.set()
        if not self.transport.is_closing():
            if cycle is None or not cycle.response_started:
                self.transport.write(plain_response(status, reason))
            self.transport.close()


def peer(transport: asyncio.BaseTransport) -> str:
    address = transport.get_extra_info("peername")
    return f"{address[0]}:{address[1]}" if isinstance(address, (tuple, list)) and len(address) >= 2 else "unknown"


def plain_response(status: int, reason: str) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, written outside of h11's state."""
    body = json.dumps({"detail": reason}).encode()
    phrase = {408: "Request Timeout", 503: "Service Unavailable"}[status]
    head = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class ResourceErrorFilter(logging.Filter):
    """asyncio logs a traceback each time `accept()` fails for lack of descriptors: once per interval, one line."""

    def __init__(self) -> None:
        super().__init__()
        self.report = ThrottledLog("could not accept connections: out of open files", level=logging.WARNING)

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        if isinstance(err, OSError) and err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            self.report.record(str(err))
            return False
        return True


class InvalidRequestFilter(logging.Filter):
    """uvicorn warns once per malformed request (or oversized headers): once per interval instead."""

    def __init__(self) -> None:
        super().__init__()
        self.report = ThrottledLog("answered 400 to malformed HTTP requests", level=logging.WARNING)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() == "Invalid HTTP request received.":
            self.report.record("headers too large, or not HTTP/1.1")
            return False
        return True


def throttle_noisy_logs() -> None:
    """Install the filters above on asyncio's and uvicorn's loggers, once."""
    for name, kind in (("asyncio", ResourceErrorFilter), ("uvicorn.error", InvalidRequestFilter)):
        named = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in named.filters):
            named.addFilter(kind())


# --- requests ---


def is_loopback_address(host: str) -> bool:
    """True for a bind address that only this machine can reach."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a `Host` header, without port, brackets or trailing dot, lower-cased."""
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:5005
        return header[1:].partition("]")[0]
    if header.count(":") == 1:
        header = header.partition(":")[0]
    return header.rstrip(".")


def is_loopback_name(name: str) -> bool:
    return name in LOOPBACK_NAMES or name.endswith(".localhost") or is_loopback_address(name)


class RequestGuard:
    """ASGI middleware: loopback `Host` names only (unless `allowed_hosts` says more), JSON POST bodies.

    `allowed_hosts`: None accepts any Host; otherwise loopback names plus these (`*`: any).
    Errors carry both `detail` (LLM Engine's shape) and `error` (OpenAI's) so that every client
    reads its own.
    """

    def __init__(self, app: Any, allowed_hosts: Iterable[str] | None = ()) -> None:
        self.app = app
        names = None if allowed_hosts is None else {host_name(h) for h in allowed_hosts}
        self.allowed = None if names is None or ANY_HOST in names else frozenset(names)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal is not None:
                await send_error(send, *refusal)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: dict[str, Any]) -> tuple[int, str] | None:
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        if self.allowed is not None and "host" in headers:
            name = host_name(headers["host"])
            if not is_loopback_name(name) and name not in self.allowed:
                return 403, (
                    f"Host {headers['host']!r} is not allowed: this server answers loopback names only "
                    "(start it with --allow-host NAME to accept another)"
                )
        if scope["method"] == "POST":
            media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
            if media_type != "application/json":
                sent = media_type or "none"
                return 415, f"the request body must be JSON sent as content-type application/json, not {sent!r}"
        return None


async def send_error(send: Any, status: int, message: str) -> None:
    kind = "permission_error" if status == 403 else "invalid_request_error"
    body = json.dumps({"detail": message, "error": {"message": message, "type": kind, "param": None, "code": None}})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body.encode()})
