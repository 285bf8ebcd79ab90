"""OpenAI's request fields and response shapes, over the engine that `Completion` uses: the work behind `openai_routes`.

An `OpenAIJob` is one request checked (a 400 naming the field otherwise) and turned into one
completion request per prompt and sample, all submitted at once so that the engine batches them,
then the answers shaped as OpenAI's `text_completion`, `chat.completion` or `chat.completion.chunk`
objects. The requests are `Completion.acreate`'s (checked as `CompletionParams`, submitted by
`completion.submit`), plus what only OpenAI asks: the prompt as token ids, the likeliest
alternatives beside each token, and `echo` (the prompt's tokens scored in one pass, batched over
the request's prompts: `research.prompt_logprobs`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..api.completion import submit
from ..api.models import LoadedModel, get_model
from ..api.outputs import AsyncCompletionStream, finish_reason_of
from ..api.types import CompletionStreamOutput, TokenOutput
from ..params import CompletionParams
from ..research.prompt_logprobs import TokenListScores, score_token_lists
from .common import RequestRecord
from .openai_errors import OpenAIError, as_openai_error
from .openai_logprobs import chat_logprobs, completion_logprobs, echoed_tokens, generated_tokens, token_bytes
from .openai_prompts import Prompt, chat_prompt_and_room, completion_prompts

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat runs to the sequence's end
MAX_N = 16
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limits
MAX_TOP_LOGPROBS = 20
UNSUPPORTED = {
    "completions": ("suffix", "logit_bias"),
    "chat": ("tools", "functions", "logit_bias", "audio", "prediction", "function_call", "tool_choice"),
}


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


@dataclass
class Choice:
    """One choice's generation, read from its stream to the end."""

    text: str = ""
    tokens: list[TokenOutput] = field(default_factory=list)
    num_completion_tokens: int = 0
    finish_reason: str = "length"


class OpenAIJob:
    """One OpenAI request, checked and turned into completion requests: prompts times `n`."""

    def __init__(
        self, kind: str, model: str, loaded: LoadedModel, prompts: list[Prompt], sampling: dict[str, Any],
        options: dict[str, Any],
    ) -> None:  # fmt: skip
        self.kind, self.model, self.loaded, self.prompts, self.sampling = kind, model, loaded, prompts, sampling
        self.n, self.stream, self.include_usage = options["n"], options["stream"], options["include_usage"]
        self.echo = options["echo"]
        # completions: logprobs=0 asks for the chosen tokens' logprobs too; chat: logprobs=false is no
        self.logprobs = options["logprobs"] is not None and options["logprobs"] is not False
        self.top_n = options["top_logprobs"] if self.logprobs else 0
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.live = True  # a person waits on it (a batch job's are offline work, run at full width)
        self._described: dict[int, tuple[str, bytes]] = {}
        self._echoed: list[TokenListScores] | None = None  # a stream's echo scores

    @classmethod
    async def build(cls, kind: str, body: dict[str, Any], target: str, timeout: float) -> OpenAIJob:
        """The job for a request `body` on the model `target` (a registered name or folder)."""
        for name in UNSUPPORTED[kind]:
            if body.get(name) not in (None, False, {}, [], "none"):
                raise OpenAIError(400, f"{name} is not supported by nanoengine", name)
        options = request_options(kind, body)  # checked before the prompt is rendered
        loaded = await asyncio.to_thread(get_model, target)
        if kind == "chat":
            prompts, default_max = await asyncio.to_thread(chat_prompt_and_room, loaded, body.get("messages"))
        else:
            prompts = await asyncio.to_thread(completion_prompts, loaded.tokenizer, body.get("prompt"))
            default_max = COMPLETIONS_DEFAULT_MAX_TOKENS
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
        return cls(kind, body["model"], loaded, prompts, sampling, options)

    def requests(self) -> list[tuple[CompletionParams, Prompt]]:
        """Each choice's checked request and prompt, in choice order; sample `j` of a seeded request gets seed + j."""
        requests = []
        for prompt in self.prompts:
            for j in range(self.n):
                seed = self.sampling["seed"]
                params = {**self.sampling, "prompt": prompt.text, "seed": None if seed is None else seed + j}
                request = CompletionParams(**params, return_token_log_probs=self.logprobs)
                self.loaded.engine.check_length(len(prompt.ids), request.max_new_tokens)
                requests.append((request, prompt))
        return requests

    async def open_streams(self) -> list[AsyncCompletionStream]:
        """Every choice's stream, started (every request checked first); if one cannot start, the
        others are closed and its error raised."""
        streams: list[AsyncCompletionStream] = []
        try:
            for request, prompt in self.requests():
                submitted = submit(request, self.loaded, prompt.ids, self.live, self.top_n)
                streams.append(AsyncCompletionStream(str(uuid.uuid4()), *submitted))
        except BaseException:
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
            raise
        return streams

    async def run(self) -> tuple[list[Choice], list[TokenListScores] | None]:
        """Every choice read to its end, and the prompts' scores when echoed."""
        streams = await self.open_streams()
        try:
            echoed = await self.echo_scores()  # while the engine generates
            return list(await asyncio.gather(*(read_choice(s) for s in streams))), echoed
        finally:
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)

    async def echo_scores(self) -> list[TokenListScores] | None:
        """Per prompt, its tokens' log-probs and alternatives, in one batched pass over the prompts."""
        if not self.echo:
            return None
        model, ids = self.loaded.model, [p.ids for p in self.prompts]
        return await asyncio.to_thread(score_token_lists, model, ids, self.top_n)

    def describe(self, token_id: int) -> tuple[str, bytes]:
        """A token's text and bytes (worked out once per request)."""
        if token_id not in self._described:
            tokenizer = self.loaded.tokenizer
            text = tokenizer.decode([token_id], skip_special_tokens=False)
            self._described[token_id] = text, token_bytes(tokenizer, token_id)
        return self._described[token_id]

    def response(self, choices: list[Choice], echoed: list[TokenListScores] | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [self.choice(i, c, echoed) for i, c in enumerate(choices)],
            "usage": usage(sum(len(p.ids) for p in self.prompts), sum(c.num_completion_tokens for c in choices)),
        }

    def choice(self, index: int, choice: Choice, echoed: list[TokenListScores] | None) -> dict[str, Any]:
        tokens = generated_tokens(choice.tokens, self.describe)
        if self.kind == "chat":
            message = {"role": "assistant", "content": choice.text, "refusal": None}
            logprobs = chat_logprobs(tokens) if self.logprobs else None
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": choice.finish_reason}
        text = choice.text
        if echoed is not None:
            prompt = self.prompts[index // self.n]
            text = prompt.text + text
            tokens = echoed_tokens(echoed[index // self.n], self.describe) + tokens
        logprobs = completion_logprobs(tokens) if self.logprobs else None
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason}

    async def events(self, streams: list[AsyncCompletionStream], record: RequestRecord) -> AsyncIterator[str]:
        """Server-sent events: the echoed prompts, the choices' chunks as they come, then the usage
        if asked, then `[DONE]`."""
        completion_tokens = [0] * len(streams)
        offsets = [0] * len(streams)  # where each choice's next text starts, for `text_offset`
        try:
            for index in range(len(streams)):
                event, offsets[index] = await self.first_event(index)
                if event is not None:
                    yield sse(event)
            async for index, output in merged(streams):
                completion_tokens[index] = output.num_completion_tokens or 0
                events, offsets[index] = self.stream_events(index, output, offsets[index])
                for event in events:
                    yield sse(event)
            if self.include_usage:
                counts = usage(sum(len(p.ids) for p in self.prompts), sum(completion_tokens))
                yield sse({**self.chunk(0, {}), "choices": [], "usage": counts})
            record.outcome = "200"
        except Exception as err:
            record.fail(err)
            error = as_openai_error(err)
            yield sse({"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}})
        finally:
            record.tokens = sum(completion_tokens)  # the response finishes the record (`common.py`)
        yield "data: [DONE]\n\n"

    async def first_event(self, index: int) -> tuple[dict[str, Any] | None, int]:
        """A chat's opening role delta, or a completion's echoed prompt; and the text offset after it."""
        if self.kind == "chat":
            return self.chunk(index, {"delta": {"role": "assistant", "content": ""}}), 0
        if not self.echo:
            return None, 0
        if index == 0:
            self._echoed = await self.echo_scores()
        prompt = self.prompts[index // self.n]
        tokens = echoed_tokens(self._echoed[index // self.n], self.describe)
        logprobs = completion_logprobs(tokens) if self.logprobs else None
        return self.chunk(index, {"text": prompt.text, "logprobs": logprobs}), len(prompt.text)

    def stream_events(self, index: int, output: CompletionStreamOutput, offset: int) -> tuple[list[dict[str, Any]], int]:
        """The events for one chunk of choice `index`, and the text offset after them."""
        tokens = generated_tokens([output.token] if output.token is not None else [], self.describe)
        events = []
        if output.text or tokens:
            if self.kind == "chat":
                logprobs = chat_logprobs(tokens) if self.logprobs else None
                events.append(self.chunk(index, {"delta": {"content": output.text}, "logprobs": logprobs}))
            else:
                logprobs = completion_logprobs(tokens, offset) if self.logprobs else None
                events.append(self.chunk(index, {"text": output.text, "logprobs": logprobs}))
        if output.finished:
            empty = {"delta": {}} if self.kind == "chat" else {"text": ""}
            events.append(self.chunk(index, {**empty, "finish_reason": finish_reason_of(output) or "length"}))
        return events, offset + len(output.text)

    def chunk(self, index: int, choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": index, "logprobs": None, "finish_reason": None, **choice}],
        }


async def read_choice(stream: AsyncCompletionStream) -> Choice:
    choice = Choice()
    async for response in stream:
        output = response.output
        choice.text += output.text
        if output.token is not None:
            choice.tokens.append(output.token)
        choice.num_completion_tokens = output.num_completion_tokens or 0
        if output.finished:
            choice.finish_reason = finish_reason_of(output) or "length"  # none only for zero new tokens
    return choice


def request_options(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """`n`, `stream`, `stream_options`, `echo` and the log-prob options (completions: `logprobs: int`;
    chat: `logprobs: bool` and `top_logprobs: int`)."""
    stream = _field(body, "stream", (bool,), "true or false", False)
    stream_options = _field(body, "stream_options", (dict,), "an object", {})
    if kind == "completions":
        logprobs = _int_in(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS, None)
        top = logprobs or 0
    else:
        logprobs = _field(body, "logprobs", (bool,), "true or false", False)
        top = _int_in(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, 0)
        if top and not logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
    return {
        "n": _int_in(body, "n", 1, MAX_N, 1),
        "stream": stream,
        "include_usage": stream and bool(stream_options.get("include_usage")),
        "echo": kind == "completions" and _field(body, "echo", (bool,), "true or false", False),
        "logprobs": logprobs,
        "top_logprobs": top,
    }


def stop_sequences(stop: Any) -> list[str] | None:
    if stop is None or isinstance(stop, str):
        return None if stop is None else [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise OpenAIError(400, f"stop must be a string or a list of strings, not {stop!r}", "stop")


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
