"""The response types, with the field names of Scale's LLM Engine client (`llmengine`).

They are plain dataclasses that speak the same small API as the client's pydantic (v1) models:
`dict()` and `json()` give exactly the JSON the LLM Engine server sends (absent values as `null`),
and `parse_obj()` / `parse_raw()` build a response back from it, so a response can cross a wire
and code written against `llmengine` keeps working.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

M = TypeVar("M", bound="_Model")


class _Model:
    """JSON conversion for the dataclasses below, named as pydantic v1 names it."""

    def dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def json(self, **dumps_kwargs: Any) -> str:
        return json.dumps(self.dict(), **dumps_kwargs)

    @classmethod
    def parse_obj(cls: type[M], obj: Any) -> M:
        """Build from a JSON object (a dict); missing optional fields become None, unknown keys are ignored."""
        if isinstance(obj, cls):
            return obj
        if not isinstance(obj, dict):
            raise ValueError(f"{cls.__name__} must be built from a JSON object, not {type(obj).__name__}")
        hints = typing.get_type_hints(cls)
        values = {}
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            hint = hints[field.name]
            if field.name in obj:
                values[field.name] = _convert(hint, obj[field.name])
            elif not _is_optional(hint):
                raise ValueError(f"{cls.__name__} lacks the required field {field.name!r}")
            else:
                values[field.name] = None
        return cls(**values)

    @classmethod
    def parse_raw(cls: type[M], raw: str | bytes) -> M:
        return cls.parse_obj(json.loads(raw))


def _is_optional(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _convert(hint: Any, value: Any) -> Any:
    """Turn nested JSON objects into the response types that `hint` names."""
    if value is None:
        return None
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return [_convert(item, v) for v in value]
    if isinstance(hint, type) and issubclass(hint, _Model):
        return hint.parse_obj(value)
    return value


@dataclass
class TokenOutput(_Model):
    """One generated token: its text and its log-probability under the model."""

    token: str
    log_prob: float


@dataclass
class CompletionOutput(_Model):
    text: str
    num_prompt_tokens: int | None
    num_completion_tokens: int
    tokens: list[TokenOutput] | None = None  # only when return_token_log_probs


@dataclass
class CompletionSyncV1Response(_Model):
    request_id: str
    output: CompletionOutput


@dataclass
class CompletionStreamOutput(_Model):
    """One chunk of a stream: `text` is the delta since the previous chunk."""

    text: str
    finished: bool
    num_prompt_tokens: int | None = None  # on the final chunk only
    num_completion_tokens: int | None = None  # cumulative
    token: TokenOutput | None = None  # only when return_token_log_probs


@dataclass
class StreamErrorContent(_Model):
    error: str
    timestamp: str


@dataclass
class StreamError(_Model):
    """An error after a stream has started, sent as the stream's last chunk."""

    status_code: int
    content: StreamErrorContent


@dataclass
class CompletionStreamV1Response(_Model):
    request_id: str
    output: CompletionStreamOutput | None = None
    error: StreamError | None = None


# The names llmengine exports for the same types.
CompletionSyncResponse = CompletionSyncV1Response
CompletionStreamResponse = CompletionStreamV1Response
