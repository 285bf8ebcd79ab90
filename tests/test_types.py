"""The response types: llmengine's field names, and a JSON round trip with what its server sends."""

from __future__ import annotations

import dataclasses
import json

import pytest

import nanoengine
from nanoengine import (
    CompletionOutput,
    CompletionStreamOutput,
    CompletionStreamResponse,
    CompletionStreamV1Response,
    CompletionSyncResponse,
    CompletionSyncV1Response,
    StreamError,
    StreamErrorContent,
    TokenOutput,
)

# Field names, in order, of the pydantic models in llmengine.data_types (scale-llm-engine 0.0.0b45).
LLMENGINE_FIELDS = {
    TokenOutput: ["token", "log_prob"],
    CompletionOutput: ["text", "num_prompt_tokens", "num_completion_tokens", "tokens"],
    CompletionSyncV1Response: ["request_id", "output"],
    CompletionStreamOutput: ["text", "finished", "num_prompt_tokens", "num_completion_tokens", "token"],
    CompletionStreamV1Response: ["request_id", "output", "error"],
    StreamError: ["status_code", "content"],
    StreamErrorContent: ["error", "timestamp"],
}

# Bodies as the LLM Engine server sends them (pydantic v1 `.json()`: absent values are null).
SYNC_BODY = {
    "request_id": "7c5e2a46-2b6f-4b0e-9d0f-6f3c8f8f2b1a",
    "output": {
        "text": " Paris.",
        "num_prompt_tokens": 7,
        "num_completion_tokens": 2,
        "tokens": [{"token": " Paris", "log_prob": -0.03}, {"token": ".", "log_prob": -0.19}],
    },
}
STREAM_BODY = {
    "request_id": "7c5e2a46-2b6f-4b0e-9d0f-6f3c8f8f2b1a",
    "output": {
        "text": ".",
        "finished": True,
        "num_prompt_tokens": 7,
        "num_completion_tokens": 2,
        "token": {"token": ".", "log_prob": -0.19},
    },
    "error": None,
}
STREAM_ERROR_BODY = {
    "request_id": "7c5e2a46-2b6f-4b0e-9d0f-6f3c8f8f2b1a",
    "output": None,
    "error": {"status_code": 500, "content": {"error": "boom", "timestamp": "2024-05-01 12:00:00.000000"}},
}


@pytest.mark.parametrize("cls", list(LLMENGINE_FIELDS), ids=lambda cls: cls.__name__)
def test_field_names_are_llmengines(cls):
    assert [f.name for f in dataclasses.fields(cls)] == LLMENGINE_FIELDS[cls]


def test_aliases_and_exports():
    assert CompletionSyncResponse is CompletionSyncV1Response
    assert CompletionStreamResponse is CompletionStreamV1Response
    for name in ["Completion", "configure", "InvalidParameterError", "RequestTimeoutError", "UnknownModelError"]:
        assert name in nanoengine.__all__ and hasattr(nanoengine, name)


@pytest.mark.parametrize(
    "cls, body",
    [
        (CompletionSyncV1Response, SYNC_BODY),
        (CompletionStreamV1Response, STREAM_BODY),
        (CompletionStreamV1Response, STREAM_ERROR_BODY),
    ],
    ids=["sync", "stream", "stream-error"],
)
def test_round_trip_with_the_servers_json(cls, body):
    response = cls.parse_obj(body)
    assert response.dict() == body
    assert json.loads(response.json()) == body
    assert cls.parse_raw(response.json()) == response
    assert cls.parse_raw(json.dumps(body).encode()) == response


def test_nested_objects_become_the_response_types():
    sync = CompletionSyncV1Response.parse_obj(SYNC_BODY)
    assert isinstance(sync.output, CompletionOutput)
    assert sync.output.tokens == [TokenOutput(" Paris", -0.03), TokenOutput(".", -0.19)]
    chunk = CompletionStreamV1Response.parse_obj(STREAM_BODY)
    assert chunk.output.token == TokenOutput(".", -0.19) and chunk.error is None
    error = CompletionStreamV1Response.parse_obj(STREAM_ERROR_BODY).error
    assert error == StreamError(500, StreamErrorContent("boom", "2024-05-01 12:00:00.000000"))


def test_optional_fields_may_be_missing_and_unknown_keys_are_ignored():
    body = {"request_id": "r", "output": {"text": "a", "finished": False}, "extra": 1}
    chunk = CompletionStreamV1Response.parse_obj(body)
    assert chunk == CompletionStreamV1Response("r", CompletionStreamOutput("a", False))
    # A server that does not report prompt tokens (llmengine defaults the field to None).
    output = CompletionOutput.parse_obj({"text": "a", "num_completion_tokens": 1})
    assert output.num_prompt_tokens is None and output.tokens is None


@pytest.mark.parametrize(
    "cls, body",
    [
        (CompletionSyncV1Response, {"output": SYNC_BODY["output"]}),
        (CompletionOutput, {"text": "a"}),
        (StreamError, {"status_code": 500}),
        (TokenOutput, ["a", -1.0]),
    ],
)
def test_missing_required_fields_are_a_value_error(cls, body):
    with pytest.raises(ValueError, match=cls.__name__):
        cls.parse_obj(body)
