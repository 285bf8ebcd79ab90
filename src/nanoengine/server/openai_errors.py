"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for the OpenAI routes."""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse

from ..errors import CheckpointError, UnknownModelError
from ..params import SPECS
from .common import ApiError, error_status

# Our parameter names in error messages, as an OpenAI client spells them (`Spec.openai`).
OPENAI_NAMES = {name: spec.openai for name, spec in SPECS.items() if spec.openai not in (None, name)}
# Request fields that a 400's message may begin with, reported as the error's `param`.
FIELDS = ("messages", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty",
          "frequency_penalty", "n", "logprobs", "top_logprobs", "echo")  # fmt: skip


class OpenAIError(ApiError):
    """An error answered in OpenAI's shape (an `ApiError`, so that the request's log line has its status)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(status, message)
        self.message, self.param, self.code = message, param, code
        self.type = "invalid_request_error" if status < 500 else "server_error"

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


def as_openai_error(err: BaseException) -> OpenAIError:
    """The error in OpenAI's shape: the status every route gives it (`common.error_status`), our
    parameter names as OpenAI spells them, and OpenAI's `param` and `code` where they apply."""
    if isinstance(err, OpenAIError):
        return err
    status, message = (400, str(err)) if isinstance(err, CheckpointError) else error_status(err)  # no chat template
    for ours, theirs in OPENAI_NAMES.items():
        message = message.replace(ours, theirs)
    if isinstance(err, UnknownModelError):
        return OpenAIError(404, message, "model", "model_not_found")
    if status == 400 and not isinstance(err, ApiError):
        field = re.match(r"\w+", message)
        return OpenAIError(400, message, field[0] if field and field[0] in FIELDS else None)
    return OpenAIError(status, message, code="timeout" if isinstance(err, TimeoutError) else None)
