"""Ray Data: the model in actors, batches of rows through `llm.generate` / `llm.score`.

    ds = ray.data.from_items([{"prompt": p} for p in prompts])
    ds = ds.map_batches(NanoEngineGenerate, fn_constructor_kwargs={"model": "smollm2-135m-instruct",
                        "max_new_tokens": 64, "temperature": 0}, batch_size=32, num_cpus=1,
                        compute=ray.data.ActorPoolStrategy(size=4, max_tasks_in_flight_per_actor=1))

Each actor loads the model once (a registered name is fetched on each node; a folder must be on
every node) and gives torch as many threads as Ray gave the actor CPUs. A batch's prompts are
submitted together, so the actor's engine runs them at its full batch width. One batch in
flight per actor keeps a job's last batches spread over the actors: Ray Data's default queues
several on each, and 400 lines on 2 actors took 109 s that way against 61 s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import ray

from ..batch.job import check_defaults, check_same_job, run_lines, score_lines
from ..batch.files import BadLine, InputLine, ResultsFile, error_record, read_input
from ..batch.progress import BatchSummary, Progress
from ..api.llm import LLM, load

logger = logging.getLogger(__name__)

DEFAULT_LINES_PER_BATCH = 64  # rows an actor answers before their output lines go back to the driver


def load_in_actor(model: str, threads: int | None) -> LLM:
    """The model, with torch's threads set to `threads` (default: the CPUs Ray gave this actor)."""
    os.environ["NANOENGINE_THREADS"] = str(threads or os.environ.get("OMP_NUM_THREADS") or "auto")
    return load(model)


class NanoEngineGenerate:
    """`map_batches` callable: adds `generated_text`, `num_prompt_tokens` and `num_completion_tokens`
    to each row, from its `prompt_column`. `sampling`: `Completion.create`'s parameters (with a
    `seed`, row i of each batch is sampled with seed + i)."""

    def __init__(
        self, model: str, *, prompt_column: str = "prompt", threads: int | None = None, **sampling: Any
    ) -> None:
        self.llm = load_in_actor(model, threads)
        self.column, self.sampling = prompt_column, sampling
        check_defaults(self.llm.folder, sampling)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        outputs = self.llm.generate([str(p) for p in batch[self.column]], progress=False, **self.sampling)
        return {
            **batch,
            "generated_text": [o.text for o in outputs],
            "num_prompt_tokens": [o.num_prompt_tokens for o in outputs],
            "num_completion_tokens": [o.num_completion_tokens for o in outputs],
        }


class NanoEngineScore:
    """`map_batches` callable: adds `logprob`, `perplexity`, `num_tokens` and `token_logprobs` to
    each row, from its `text_column` (see `llm.score`)."""

    def __init__(self, model: str, *, text_column: str = "text", threads: int | None = None) -> None:
        self.llm = load_in_actor(model, threads)
        self.column = text_column

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        scored = self.llm.score([str(t) for t in batch[self.column]])
        return {
            **batch,
            "logprob": [s.logprob for s in scored],
            "perplexity": [s.perplexity for s in scored],
            "num_tokens": [len(s.tokens) for s in scored],
            "token_logprobs": [s.token_logprobs for s in scored],
        }


class BatchLines:
    """`map_batches` callable for `nanoengine batch --ray`: rows of input lines in, their output
    lines out (as JSON text, with the tokens each took), answered as `llm.run_batch` answers them."""

    def __init__(
        self,
        model: str,
        defaults: dict[str, Any],
        *,
        score: bool = False,
        window: int | None = None,
        threads: int | None = None,
    ) -> None:
        self.llm = load_in_actor(model, threads)
        self.defaults, self.score = defaults, score
        self.window = window or 4 * self.llm.engine.settings.max_batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        columns = zip(batch["number"], batch["custom_id"], batch["kind"], batch["fields"])
        lines = [InputLine(int(n), str(custom_id), str(kind), json.loads(fields)) for n, custom_id, kind, fields in columns]
        records: list[str] = []
        tokens: list[int] = []

        def keep(record: dict[str, Any], count: int = 0) -> None:
            records.append(json.dumps(record, ensure_ascii=False, allow_nan=False))
            tokens.append(count)

        if self.score:
            score_lines(self.llm, lines, keep)
        else:
            asyncio.run(run_lines(self.llm, lines, self.defaults, self.window, keep))
        return {"record": records, "tokens": tokens}


def run_batch_on_ray(
    model: str,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    address: str = "local",
    actors: int = 2,
    threads: int = 1,
    score: bool = False,
    window: int | None = None,
    lines_per_batch: int = DEFAULT_LINES_PER_BATCH,
    progress: bool | None = None,
    **sampling: Any,
) -> BatchSummary:
    """`llm.run_batch` with the model in `actors` Ray actors of `threads` CPUs each.

    The driver reads the input and the output (what is done), writes the bad lines' answers, and
    makes a Ray dataset of the other lines; the actors answer them a batch at a time and the
    driver appends each batch's output lines as it comes back, so a rerun resumes as in one
    process. `address`: `local` starts a Ray instance on this machine for the call (stopped at
    its end), `auto` joins the one `ray start` made, else a cluster's address. An already
    initialized Ray (`ray.init()` before the call) is used as it is.
    """
    from ..weights.registry import resolve_model

    defaults = check_defaults(resolve_model(model), sampling)
    lines = read_input(input_path)
    started = connect(address, actors * threads)
    try:
        with ResultsFile(output_path) as results:
            check_same_job(lines, results.done, output_path)
            pending = [line for line in lines if line.key not in results.done]
            meter = Progress(len(lines), len(lines) - len(pending), "batch --ray", progress)
            with meter:
                write = meter.counting(results.write)
                for line in pending:
                    if isinstance(line, BadLine):
                        write(error_record(line))
                options = {"score": score, "window": window, "threads": threads}
                runnable = [line for line in pending if isinstance(line, InputLine)]
                for record, count in answered_on_ray(runnable, (model, defaults), options, actors, lines_per_batch):
                    write(record, count)
    finally:
        if started:
            ray.shutdown()
    return meter.summary()


def answered_on_ray(
    lines: list[InputLine], args: tuple, options: dict[str, Any], actors: int, lines_per_batch: int
) -> Iterator[tuple[dict[str, Any], int]]:
    """Each line's output line and tokens, from `BatchLines` actors, a batch at a time as they come."""
    if not lines:
        return
    rows = [
        {"number": line.number, "custom_id": line.custom_id, "kind": line.kind, "fields": json.dumps(line.fields)}
        for line in lines
    ]
    answered = ray.data.from_items(rows).map_batches(
        BatchLines, fn_constructor_args=args, fn_constructor_kwargs=options, batch_size=lines_per_batch,
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1), num_cpus=options["threads"],
    )  # fmt: skip
    for batch in answered.iter_batches(batch_size=None, batch_format="default"):
        for record, count in zip(batch["record"], batch["tokens"]):
            yield json.loads(record), int(count)


def connect(address: str, cpus: int) -> bool:
    """Connect to Ray (see `run_batch_on_ray`); whether this call started the Ray it stops."""
    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(  # on loopback: this machine's instance, reachable from nowhere else
            address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1"
        )
    else:
        ray.init(address=address, log_to_driver=False)
    return True
