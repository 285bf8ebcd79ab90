"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for the OpenAI routes."""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse

from ..errors import CheckpointError, InvalidParameterError, UnknownModelError
from .app import ApiError

# Our parameter names in error messages, as an OpenAI client spells them.
OPENAI_NAMES = {"max_new_tokens": "max_tokens", "stop_sequences": "stop", "return_token_log_probs": "logprobs"}
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
    if isinstance(err, OpenAIError):
        return err
    if isinstance(err, ApiError):  # a body too large or not JSON
        return OpenAIError(err.status, err.detail)
    message = str(err)
    for ours, theirs in OPENAI_NAMES.items():
        message = message.replace(ours, theirs)
    if isinstance(err, UnknownModelError):
        return OpenAIError(404, message, "model", "model_not_found")
    if isinstance(err, (InvalidParameterError, CheckpointError)):  # CheckpointError here: no chat template
        field = re.match(r"\w+", message)
        return OpenAIError(400, message, field[0] if field and field[0] in FIELDS else None)
    if isinstance(err, TimeoutError):
        return OpenAIError(500, message, code="timeout")
    return OpenAIError(500, f"internal error: {type(err).__name__}: {message}")
