"""`llm.run_batch` and `nanoengine batch`: a JSONL file of requests through the engine, resumably.

Every input line is checked and tokenized first (a bad one gets its own error line), then the
requests go to the engine a window at a time (a few times its batch size, so that it always has
a full batch) and each result is appended to the output as it finishes, in finishing order. The
files and the resuming are in `batch_files.py`. With `score`, each line's text is scored
(`llm.score`) instead: its tokens' log-probabilities and its perplexity.

OpenAI-format lines are read with the OpenAI routes' own request mapping (`OpenAIJob`), so a
batch line means what the same body posted to `nanoengine serve` means; it needs the `server`
extra. The model is the batch's: a body's `model` is only echoed back.
"""

from __future__ import annotations

import asyncio
import math
import os
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..api.completion import submit
from ..api.outputs import AsyncCompletionStream, collect
from ..api.types import CompletionSyncV1Response
from ..errors import InvalidParameterError, NanoEngineError
from ..params import DEFAULTS, NO_TIMEOUT, SAMPLING_NAMES, CompletionParams, seed_for
from .files import BadLine, InputLine, ResultsFile, error_record, read_input, result_record
from .progress import BatchSummary, Progress

if TYPE_CHECKING:
    from ..api.llm import LLM

SCORE_CHUNK = 32  # texts per `llm.score` call: each chunk's lines are written when it is done
Record = dict[str, Any]
Write = Callable[..., None]  # write(record, tokens=0): append an output line; tokens generated for it


@dataclass
class Job:
    """One input line, checked and tokenized, ready to run; how its failure is answered."""

    line: InputLine
    run: Callable[[], Awaitable[tuple[dict[str, Any], int]]]  # the answer's body and the tokens generated
    failure: Callable[[BaseException], tuple[int, dict[str, Any]]]
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # the response's, shared by its choices


def run_batch(
    llm: LLM,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    score: bool = False,
    window: int | None = None,
    progress: bool | None = None,
    sync_seconds: float = 1.0,
    **sampling: Any,
) -> BatchSummary:
    """Answer every line of `input_path` into `output_path`, skipping the lines already answered there.

    `sampling` (`Completion.create`'s parameters) are the defaults of plain lines; with a `seed`,
    line N is sampled with seed + N - 1. `window` bounds the requests handed to the engine at
    once (default: 4 times its batch size).
    """
    defaults = check_defaults(llm.folder, sampling)
    window = window if window is not None else 4 * llm.engine.settings.max_batch_size
    if not isinstance(window, int) or window < 1:
        raise InvalidParameterError(f"window must be an integer >= 1, not {window!r}")
    lines = read_input(input_path)
    with ResultsFile(output_path, sync_seconds) as results:
        check_same_job(lines, results.done, output_path)
        pending = [line for line in lines if line.key not in results.done]
        meter = Progress(len(lines), len(lines) - len(pending), "score" if score else "batch", progress)
        with meter:
            write = meter.counting(results.write)
            if score:
                score_lines(llm, pending, write)
            else:
                asyncio.run(run_lines(llm, pending, defaults, window, write))
    return meter.summary()


def check_defaults(model_name: str | os.PathLike, sampling: dict[str, Any]) -> dict[str, Any]:
    """The batch's default parameters, all checked before any work."""
    check_known(sampling, SAMPLING_NAMES)
    defaults = {**{name: DEFAULTS[name] for name in SAMPLING_NAMES}, "timeout": NO_TIMEOUT, **sampling}
    CompletionParams(model_name=model_name, prompt="x", **defaults)
    return defaults


def check_known(params: dict[str, Any], known: Iterable[str]) -> None:
    unknown = set(params) - set(known)
    if unknown:
        raise InvalidParameterError(f"unknown parameter(s) {', '.join(sorted(unknown))}; known: {', '.join(known)}")


def check_same_job(lines: list[InputLine | BadLine], done: set, output_path: str | os.PathLike) -> None:
    """Refuse to append to an output that holds answers to lines this input does not have."""
    foreign = done - {line.key for line in lines}
    if foreign:
        kind, value = sorted(foreign, key=str)[0]
        what = f"custom_id {value!r}" if kind == "id" else f"line {value}"
        raise NanoEngineError(
            f"{output_path} holds {len(foreign)} answer(s) to requests that the input does not have "
            f"(e.g. {what}): it is another job's output; give a new output file"
        )


async def run_lines(
    llm: LLM, lines: Iterable[InputLine | BadLine], defaults: dict[str, Any], window: int, write: Write
) -> None:
    """Check and tokenize every line (bad ones are answered at once), then run the jobs a window
    at a time, writing each answer as it finishes."""
    jobs = []
    for line in lines:
        job = await prepare(llm, line, defaults)
        if isinstance(job, Job):
            jobs.append(job)
        else:
            write(job)
    slots = asyncio.Semaphore(window)
    running: set[asyncio.Task] = set()

    async def run_and_write(job: Job) -> None:
        try:
            record, tokens = await run_job(job)
        finally:
            slots.release()
        write(record, tokens)

    try:
        for job in jobs:
            await slots.acquire()
            task = asyncio.ensure_future(run_and_write(job))
            running.add(task)
            task.add_done_callback(running.discard)
        while running:
            await asyncio.gather(*running)
    finally:  # interrupted: every request still running stops
        for task in running:
            task.cancel()


async def prepare(llm: LLM, line: InputLine | BadLine, defaults: dict[str, Any]) -> Job | Record:
    """The line's job, or the output line that answers it (the line is bad, or a parameter is)."""
    if isinstance(line, BadLine):
        return error_record(line)
    if line.kind == "plain":
        try:
            return plain_job(llm, line, defaults)
        except Exception as err:
            return result_record(line.custom_id, *plain_failure(err))
    try:
        from ..server.openai_errors import as_openai_error
    except ImportError:
        message = "OpenAI-format batch lines need the server extra: pip install 'nanoengine[server]'"
        raise NanoEngineError(message) from None
    try:
        return await openai_job(llm, line, defaults["timeout"])
    except Exception as err:
        return result_record(line.custom_id, *openai_failure(as_openai_error(err)))


def plain_job(llm: LLM, line: InputLine, defaults: dict[str, Any]) -> Job:
    from ..api.chat import chat_prompt

    fields = dict(line.fields)
    prompt, messages = fields.pop("prompt", None), fields.pop("messages", None)
    if (prompt is None) == (messages is None):
        raise InvalidParameterError("a plain line has either a prompt or messages (and optional parameters)")
    check_known(fields, defaults)
    if messages is not None:
        prompt = chat_prompt(llm.tokenizer, messages)
    params = {**defaults, **fields}
    if "seed" not in fields and defaults["seed"] is not None:
        params["seed"] = seed_for(defaults["seed"], line.number - 1)
    request = CompletionParams(model_name=llm.folder, prompt=prompt, **params)
    ids, request_id = tokenized(llm, request), uuid.uuid4().hex

    async def run() -> tuple[dict[str, Any], int]:
        stream = AsyncCompletionStream(request_id, *submit(request, llm._loaded, ids, live=False))
        try:
            output = collect(request, [chunk.output async for chunk in stream])
        finally:
            await stream.aclose()
        return CompletionSyncV1Response(request_id, output).dict(), output.num_completion_tokens

    return Job(line, run, plain_failure, request_id)


async def openai_job(llm: LLM, line: InputLine, timeout: float) -> Job:
    """The job for an OpenAI request body, mapped and answered as the server's OpenAI routes do."""
    from ..server.openai_errors import OpenAIError, as_openai_error
    from ..server.openai_schema import OpenAIJob

    body = {"model": llm.folder.name, **line.fields}
    if body.get("stream"):
        raise OpenAIError(400, "stream is not supported in a batch: each answer is written whole", "stream")
    openai = await OpenAIJob.build(line.kind, body, str(llm.folder), timeout)
    openai.live = False  # offline work: the engine runs it at full width
    openai.requests()  # every choice checked before any work

    async def run() -> tuple[dict[str, Any], int]:
        choices, echoed = await openai.run()
        return openai.response(choices, echoed), sum(c.num_completion_tokens for c in choices)

    return Job(line, run, lambda err: openai_failure(as_openai_error(err)))


def tokenized(llm: LLM, request: CompletionParams) -> list[int]:
    ids = llm.tokenizer.encode(request.prompt)
    llm.engine.check_length(len(ids), request.max_new_tokens)
    return ids


def plain_failure(err: BaseException) -> tuple[int, dict[str, Any]]:
    """LLM Engine's error shape: 400 for a bad request, 500 for a failure while running it."""
    return (400 if isinstance(err, ValueError) else 500), {"detail": str(err)}


def openai_failure(err: Any) -> tuple[int, dict[str, Any]]:
    error = {"message": err.message, "type": err.type, "param": err.param, "code": err.code}
    return err.status, {"error": error}


async def run_job(job: Job) -> tuple[Record, int]:
    """Run the job (its choices together: the engine batches them); the answer and its tokens."""
    tokens = 0
    try:
        (body, tokens), status = await job.run(), 200
    except Exception as err:
        status, body = job.failure(err)
    return result_record(job.line.custom_id, status, body, job.request_id), tokens


def score_lines(llm: LLM, lines: list[InputLine | BadLine], write: Write) -> None:
    """Score each line's text (`text` or `prompt`; for OpenAI lines the body's `prompt`), a chunk at a time."""
    from ..research.scoring import encode_texts

    texts: list[tuple[InputLine, str]] = []
    for line in lines:
        if isinstance(line, BadLine):
            write(error_record(line))
            continue
        text = line.fields.get("text", line.fields.get("prompt"))
        try:
            if text is None:
                raise InvalidParameterError("a line to score has a text (or a prompt): a string")
            encode_texts(llm.tokenizer, [text], llm.model.config.max_position_embeddings)
        except InvalidParameterError as err:
            named = InvalidParameterError(str(err).replace("texts[0]", "text"))
            write(result_record(line.custom_id, *plain_failure(named)))
            continue
        texts.append((line, text))
    for start in range(0, len(texts), SCORE_CHUNK):
        chunk = texts[start : start + SCORE_CHUNK]
        for (line, _), scored in zip(chunk, llm.score([text for _, text in chunk])):
            write(result_record(line.custom_id, 200, score_body(scored)))


def score_body(scored: Any) -> dict[str, Any]:
    perplexity = scored.perplexity
    return {
        "object": "score",
        "tokens": scored.tokens,
        "token_logprobs": scored.token_logprobs,
        "logprob": scored.logprob,
        "perplexity": None if math.isnan(perplexity) else perplexity,  # a one-token text has nothing scored
    }
