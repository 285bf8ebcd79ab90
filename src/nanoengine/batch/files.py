"""The two files of a batch job: its input lines, and an output that survives a crash.

Input: JSON lines, one request each, in OpenAI's batch format
(`{"custom_id", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions", "body"}`) or
in a plain form (`{"prompt": ...}` or `{"messages": ...}` with `Completion.create`'s parameters,
and a `custom_id` that defaults to `line-N`). Blank lines are skipped.

Output: one line per input line, in OpenAI's batch output shape
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`. A line that
cannot be run as a request at all (not JSON, no `custom_id`, one already used) gets `error` and
its input `line` number instead of a response.

Nothing is lost: each output line is one `write` on a file opened for appending, so a process
killed at any moment leaves complete lines and at most one torn last line; the data is in the
kernel's hands once written (only a power cut can lose it: `fsync` runs every `sync_seconds`
and at the end). Reopening the output cuts a torn last line off and reports which requests are
done, so a rerun skips them and the final output holds each input line exactly once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import NanoEngineError

logger = logging.getLogger(__name__)

URLS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
Key = tuple[str, Any]  # ("id", custom_id) for a runnable line, ("line", number) for one that is not


class BatchFileError(NanoEngineError):
    """A batch's input or output file cannot be used (unreadable, or not this job's output)."""


@dataclass(frozen=True)
class InputLine:
    """One runnable input line: `kind` is `completions` or `chat` (OpenAI's format) or `plain`;
    `fields` is the OpenAI request body, or the plain object without its `custom_id`."""

    number: int  # 1-based line number in the input file
    custom_id: str
    kind: str
    fields: dict[str, Any]

    @property
    def key(self) -> Key:
        return ("id", self.custom_id)


@dataclass(frozen=True)
class BadLine:
    """An input line that cannot be run as a request; it is answered by an error line."""

    number: int
    custom_id: str | None
    code: str
    message: str

    @property
    def key(self) -> Key:
        return ("line", self.number)


def read_input(path: str | os.PathLike) -> list[InputLine | BadLine]:
    """Every non-blank line of the input, parsed; the first of two lines with one `custom_id` wins."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BatchFileError(f"cannot read the batch input {path}: {err}") from None
    lines: list[InputLine | BadLine] = []
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        line = parse_line(number, raw)
        if isinstance(line, InputLine):
            if line.custom_id in first_seen:
                first = first_seen[line.custom_id]
                message = f"custom_id {line.custom_id!r} is also on line {first}: each must be unique"
                line = BadLine(number, line.custom_id, "duplicate_custom_id", message)
            else:
                first_seen[line.custom_id] = number
        lines.append(line)
    return lines


def parse_line(number: int, raw: str) -> InputLine | BadLine:
    """One input line: OpenAI's format when it has a `body`, else the plain form."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        return BadLine(number, None, "invalid_json", f"line {number} is not JSON: {err}")
    if not isinstance(obj, dict):
        return BadLine(number, None, "invalid_line", f"line {number} must be a JSON object, not {type(obj).__name__}")
    custom_id = obj.get("custom_id", None if "body" in obj else f"line-{number}")
    if not isinstance(custom_id, str) or not custom_id:
        message = f"line {number}: custom_id must be a non-empty string, not {custom_id!r}"
        return BadLine(number, None, "missing_custom_id", message)
    if "body" not in obj:
        return InputLine(number, custom_id, "plain", {k: v for k, v in obj.items() if k != "custom_id"})
    return openai_line(number, custom_id, obj)


def openai_line(number: int, custom_id: str, obj: dict[str, Any]) -> InputLine | BadLine:
    body, url, method = obj["body"], obj.get("url"), obj.get("method", "POST")
    if not isinstance(body, dict):
        return BadLine(number, custom_id, "invalid_line", f"line {number}: body must be a JSON object")
    if method != "POST":
        return BadLine(number, custom_id, "invalid_line", f"line {number}: method must be POST, not {method!r}")
    if url is None:  # OpenAI requires it; the body says which it is
        url = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    if url not in URLS:
        message = f"line {number}: url must be one of {', '.join(URLS)}, not {url!r}"
        return BadLine(number, custom_id, "unsupported_url", message)
    return InputLine(number, custom_id, URLS[url], body)


def result_record(custom_id: str, status: int, body: dict[str, Any], request_id: str | None = None) -> dict[str, Any]:
    """An output line with a response (a request's result, or its 4xx/5xx error body)."""
    response = {"status_code": status, "request_id": request_id or uuid.uuid4().hex, "body": body}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response, "error": None}


def error_record(bad: BadLine) -> dict[str, Any]:
    """The output line of an input line that is not a request."""
    error = {"code": bad.code, "message": bad.message}
    record_id = f"batch_req_{uuid.uuid4().hex}"
    return {"id": record_id, "custom_id": bad.custom_id, "line": bad.number, "response": None, "error": error}


def record_key(record: dict[str, Any]) -> Key:
    return ("line", record["line"]) if "line" in record else ("id", record["custom_id"])


class ResultsFile:
    """The output, opened for appending: `done` holds the keys of the lines already written.

    Held with an exclusive lock while open, so that two jobs never append to one file.
    """

    def __init__(self, path: str | os.PathLike, sync_seconds: float = 1.0) -> None:
        self.path, self.sync_seconds = Path(path), sync_seconds
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as err:
            raise BatchFileError(f"cannot open the batch output {path}: {err}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.done = self._recover()
        except BaseException as err:
            os.close(self._fd)
            if isinstance(err, BlockingIOError):
                raise BatchFileError(f"{path} is being written by another batch job") from None
            raise
        self._last_sync = time.monotonic()

    def _recover(self) -> set[Key]:
        """Cut a torn last line off; the keys of the complete ones."""
        with open(self._fd, "rb", closefd=False) as f:
            data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            torn = len(data) - end
            logger.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run", self.path, torn)
            os.ftruncate(self._fd, end)
        done = set()
        for number, raw in enumerate(data[:end].splitlines(), 1):
            try:
                done.add(record_key(json.loads(raw)))
            except (ValueError, KeyError, TypeError):
                raise BatchFileError(
                    f"{self.path} line {number} is not a batch output line: is it this job's output?"
                ) from None
        return done

    def write(self, record: dict[str, Any]) -> None:
        """Append one complete line (one `write`), and `fsync` if the last was `sync_seconds` ago."""
        line = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode()
        written = os.write(self._fd, line)
        if written != len(line):  # a full disk: the torn line is cut off on the next run
            raise BatchFileError(f"{self.path}: only {written} of {len(line)} bytes written (is the disk full?)")
        self.done.add(record_key(record))
        if time.monotonic() - self._last_sync >= self.sync_seconds:
            os.fsync(self._fd)
            self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)  # also releases the lock
                self._fd = -1

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
