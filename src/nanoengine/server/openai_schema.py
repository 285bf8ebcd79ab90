"""OpenAI's request fields and response shapes, over `Completion.acreate`: the work behind `openai_api`.

An `OpenAIJob` is one request checked (a 400 naming the field otherwise) and turned into
`acreate` calls, one per prompt and sample, then the answers shaped as OpenAI's `text_completion`,
`chat.completion` or `chat.completion.chunk` objects.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse

from ..api.chat import chat_prompt
from ..api.completion import AsyncCompletionStream, Completion
from ..errors import CheckpointError, InvalidParameterError, UnknownModelError
from ..api.models import get_model
from .common import ApiError, RequestRecord
from ..api.types import CompletionOutput, CompletionStreamOutput, TokenOutput

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat runs to the sequence's end
MAX_N = 16
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limits
MAX_TOP_LOGPROBS = 20
# Our parameter names in error messages, as an OpenAI client spells them.
OPENAI_NAMES = {"max_new_tokens": "max_tokens", "stop_sequences": "stop", "return_token_log_probs": "logprobs"}
# Request fields that a 400's message may begin with, reported as the error's `param`.
FIELDS = ("messages", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty",
          "frequency_penalty", "n", "logprobs", "top_logprobs")  # fmt: skip
UNSUPPORTED = {
    "completions": ("suffix", "logit_bias", "echo"),
    "chat": ("tools", "functions", "logit_bias", "audio", "prediction", "function_call", "tool_choice"),
}


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


def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], allowed: str, default: Any = None) -> Any:
    """`body[name]` if of one of `kinds` (bools are not numbers here), else a 400 naming it."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise OpenAIError(400, f"{name} must be {allowed}, not {value!r}", name)
    return value


def _int_in(body: dict[str, Any], name: str, low: int, high: int, default: int | None) -> int | None:
    value = _field(body, name, (int,), f"an integer in [{low}, {high}]", default)
    if value is not None and not low <= value <= high:
        raise OpenAIError(400, f"{name} must be an integer in [{low}, {high}], not {value}", name)
    return value


class OpenAIJob:
    """One OpenAI request, checked and turned into `Completion.acreate` calls: prompts times `n`."""

    def __init__(
        self, kind: str, model: str, prompts: list[str], sampling: dict[str, Any], options: dict[str, Any]
    ) -> None:
        self.kind, self.model, self.prompts, self.sampling = kind, model, prompts, sampling
        self.n, self.stream, self.include_usage = options["n"], options["stream"], options["include_usage"]
        # completions: logprobs=0 asks for the chosen tokens' logprobs too; chat: logprobs=false is no
        self.logprobs = options["logprobs"] is not None and options["logprobs"] is not False
        self.top_logprobs = options["top_logprobs"]
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        if self.logprobs:
            self.sampling["return_token_log_probs"] = True

    @classmethod
    async def build(cls, kind: str, body: dict[str, Any], target: str, timeout: float) -> OpenAIJob:
        """The job for a request `body` on the model `target` (a registered name or folder)."""
        for name in UNSUPPORTED[kind]:
            if body.get(name) not in (None, False, {}, [], "none"):
                raise OpenAIError(400, f"{name} is not supported by nanoengine", name)
        options = request_options(kind, body)  # checked before the prompt is rendered
        if kind == "chat":
            prompts, remaining = await asyncio.to_thread(chat_prompt_and_room, target, body.get("messages"))
            default_max = remaining
        else:
            prompts, default_max = completion_prompts(body.get("prompt")), COMPLETIONS_DEFAULT_MAX_TOKENS
        max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        best_of = body.get("best_of")
        if kind == "completions" and best_of is not None and best_of != body.get("n", 1):
            raise OpenAIError(400, "best_of is not supported by nanoengine (only best_of equal to n)", "best_of")
        sampling = {
            "model_name": target,
            "timeout": timeout,
            "max_new_tokens": _field(body, max_name, (int,), "an integer", default_max),
            "temperature": _field(body, "temperature", (int, float), "a number", 1.0),
            "top_p": _field(body, "top_p", (int, float), "a number", 1.0),
            "stop_sequences": stop_sequences(body.get("stop")),
            "seed": _field(body, "seed", (int,), "an integer"),
            "presence_penalty": _field(body, "presence_penalty", (int, float), "a number") or None,
            "frequency_penalty": _field(body, "frequency_penalty", (int, float), "a number") or None,
        }
        return cls(kind, body["model"], prompts, sampling, options)

    def calls(self) -> list[dict[str, Any]]:
        """`acreate` keywords per choice, in choice order; sample `j` of a seeded request gets seed + j."""
        calls = []
        for prompt in self.prompts:
            for j in range(self.n):
                seed = self.sampling["seed"]
                calls.append({**self.sampling, "prompt": prompt, "seed": None if seed is None else seed + j})
        return calls

    async def run(self) -> list[CompletionOutput]:
        responses = await asyncio.gather(*(Completion.acreate(**call) for call in self.calls()))
        return [r.output for r in responses]

    async def open_streams(self) -> list[AsyncCompletionStream]:
        """Every choice's stream, started; if one cannot start, the others are closed and its error raised."""
        streams: list[AsyncCompletionStream] = []
        try:
            for call in self.calls():
                streams.append(await Completion.acreate(**call, stream=True))
        except BaseException:
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
            raise
        return streams

    def finish_reason(self, num_completion_tokens: int | None) -> str:
        return "length" if (num_completion_tokens or 0) >= self.sampling["max_new_tokens"] else "stop"

    def response(self, outputs: list[CompletionOutput]) -> dict[str, Any]:
        choices = [self.choice(i, o) for i, o in enumerate(outputs)]
        prompt_tokens = sum(o.num_prompt_tokens or 0 for o in outputs[:: self.n])  # each prompt once
        return {
            "id": self.id,
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage(prompt_tokens, sum(o.num_completion_tokens for o in outputs)),
        }

    def choice(self, index: int, output: CompletionOutput) -> dict[str, Any]:
        reason = self.finish_reason(output.num_completion_tokens)
        tokens = output.tokens or []
        if self.kind == "chat":
            message = {"role": "assistant", "content": output.text, "refusal": None}
            logprobs = self.chat_logprobs(tokens) if self.logprobs else None
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}
        logprobs = completion_logprobs(tokens) if self.logprobs else None
        return {"index": index, "text": output.text, "logprobs": logprobs, "finish_reason": reason}

    def chat_logprobs(self, tokens: list[TokenOutput]) -> dict[str, Any]:
        """OpenAI's chat shape; the alternatives hold the chosen token only (the engine reports no others)."""

        def entry(token: TokenOutput) -> dict[str, Any]:
            return {"token": token.token, "logprob": token.log_prob, "bytes": list(token.token.encode())}

        content = [{**entry(t), "top_logprobs": [entry(t)] if self.top_logprobs else []} for t in tokens]
        return {"content": content, "refusal": None}

    async def events(self, streams: list[AsyncCompletionStream], record: RequestRecord) -> AsyncIterator[str]:
        """Server-sent events: the choices' chunks as they come, then the usage if asked, then `[DONE]`."""
        prompt_tokens, completion_tokens = 0, [0] * len(streams)
        try:
            if self.kind == "chat":
                for index in range(len(streams)):
                    yield sse(self.chunk(index, {"delta": {"role": "assistant", "content": ""}}))
            async for index, output in merged(streams):
                completion_tokens[index] = output.num_completion_tokens or 0
                if output.finished and index % self.n == 0:
                    prompt_tokens += output.num_prompt_tokens or 0
                for event in self.stream_events(index, output):
                    yield sse(event)
            if self.include_usage:
                yield sse({**self.chunk(0, {}), "choices": [], "usage": usage(prompt_tokens, sum(completion_tokens))})
            record.outcome = "200"
        except Exception as err:
            record.fail(err)
            error = as_openai_error(err)
            yield sse({"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}})
        finally:
            record.tokens = sum(completion_tokens)
            record.finish()
        yield "data: [DONE]\n\n"

    def stream_events(self, index: int, output: CompletionStreamOutput) -> list[dict[str, Any]]:
        tokens = [output.token] if output.token is not None else []
        events = []
        if output.text or tokens:
            if self.kind == "chat":
                logprobs = self.chat_logprobs(tokens) if self.logprobs else None
                events.append(self.chunk(index, {"delta": {"content": output.text}, "logprobs": logprobs}))
            else:
                logprobs = completion_logprobs(tokens) if self.logprobs else None
                events.append(self.chunk(index, {"text": output.text, "logprobs": logprobs}))
        if output.finished:
            reason = self.finish_reason(output.num_completion_tokens)
            empty = {"delta": {}} if self.kind == "chat" else {"text": ""}
            events.append(self.chunk(index, {**empty, "finish_reason": reason}))
        return events

    def chunk(self, index: int, choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": index, "logprobs": None, "finish_reason": None, **choice}],
        }


def request_options(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """`n`, `stream`, `stream_options` and the log-prob options (completions: `logprobs: int`; chat:
    `logprobs: bool` and `top_logprobs: int`)."""
    stream = _field(body, "stream", (bool,), "true or false", False)
    stream_options = _field(body, "stream_options", (dict,), "an object", {})
    if kind == "completions":
        logprobs, top = _int_in(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS, None), 0
    else:
        logprobs = _field(body, "logprobs", (bool,), "true or false", False)
        top = _int_in(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, 0)
        if top and not logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
    return {
        "n": _int_in(body, "n", 1, MAX_N, 1),
        "stream": stream,
        "include_usage": stream and bool(stream_options.get("include_usage")),
        "logprobs": logprobs,
        "top_logprobs": top,
    }


def chat_prompt_and_room(target: str, messages: Any) -> tuple[list[str], int]:
    """The chat's prompt, and how many tokens the engine's longest sequence leaves after it."""
    loaded = get_model(target)
    prompt = chat_prompt(loaded.tokenizer, messages)
    room = loaded.engine.max_seq_len - len(loaded.tokenizer.encode(prompt))
    return [prompt], max(room, 1)  # a prompt that fills the context is refused by the completion, by name


def completion_prompts(prompt: Any) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    raise OpenAIError(400, "prompt must be a string or a non-empty list of strings (token ids are not supported)", "prompt")


def stop_sequences(stop: Any) -> list[str] | None:
    if stop is None or isinstance(stop, str):
        return None if stop is None else [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise OpenAIError(400, f"stop must be a string or a list of strings, not {stop!r}", "stop")


def completion_logprobs(tokens: list[TokenOutput]) -> dict[str, Any]:
    """The legacy completions shape; `top_logprobs` holds the chosen token only (the engine reports no others)."""
    offsets, offset = [], 0
    for token in tokens:
        offsets.append(offset)
        offset += len(token.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.log_prob for t in tokens],
        "top_logprobs": [{t.token: t.log_prob} for t in tokens],
        "text_offset": offsets,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def merged(streams: list[AsyncCompletionStream]) -> AsyncIterator[tuple[int, CompletionStreamOutput]]:
    """The chunks of several streams as they come, tagged with their stream's index.

    Closing this generator (the client left) stops every stream's generation.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncCompletionStream) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk.output, None))
            await queue.put((index, None, None))
        except Exception as err:
            await queue.put((index, None, err))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, output, err = await queue.get()
            if err is not None:
                raise err
            if output is None:
                running -= 1
            else:
                yield index, output
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
