"""`nanoengine batch INPUT.jsonl OUTPUT.jsonl`: a file of requests, answered into a file, resumably.

In one process (`batch/job.py`), or with `--ray [ADDRESS]` across a Ray cluster's actors
(`nanoengine.ray`, the `ray` extra). Rerunning the same command after a crash resumes it.
"""

from __future__ import annotations

import argparse
import logging
import os

from . import options as check
from ..errors import InvalidParameterError
from ..weights.registry import DEFAULT_MODEL
from .serve_ray import LOCAL

logger = logging.getLogger("nanoengine")
BATCH_SAMPLING = ("max_new_tokens", "temperature", "seed")  # defaults of plain lines; line N gets seed + N - 1


def add_batch_command(commands: argparse._SubParsersAction) -> None:
    batch = commands.add_parser(
        "batch",
        help="answer a JSONL file of requests (OpenAI's batch format) into a JSONL file; resumable",
        description="Answers every line of INPUT (OpenAI batch lines with custom_id and a /v1/completions or "
        "/v1/chat/completions body, or plain {\"prompt\": ...} / {\"messages\": ...} lines with sampling "
        "fields) into OUTPUT, one line each as it finishes. Rerun the same command after a crash: it skips "
        "the lines already answered. Plain lines take the options below as defaults (line N is sampled with "
        "SEED + N - 1).",
    )
    option = batch.add_argument
    option("input", metavar="INPUT.jsonl", help="the requests, one JSON object per line")
    option("output", metavar="OUTPUT.jsonl", help="the answers; appended to, so that a rerun resumes")
    option("--model", default=DEFAULT_MODEL, help=f"registered name or checkpoint folder (default: {DEFAULT_MODEL})")
    option("--score", action="store_true", help="score each line's text (log-probs, perplexity) instead of completing")
    check.add_sampling_options(batch, BATCH_SAMPLING)
    option("--window", type=check.positive_int, metavar="N",
           help="most requests handed to the engine at once (default: 4 times --max-batch-size)")  # fmt: skip
    option("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    option(
        "--ray", nargs="?", const=LOCAL, metavar="ADDRESS",
        help="run on Ray actors (needs the ray extra): on a cluster's ADDRESS (auto: the one `ray start` "
        "made here), or without one on a Ray instance started on this machine for the command "
        "(give it after INPUT and OUTPUT, or as --ray=ADDRESS)",
    )  # fmt: skip
    option("--ray-actors", type=check.positive_int, default=2, metavar="N", help="model actors with --ray (default: 2)")
    option("--ray-threads", type=check.positive_int, default=1, metavar="N",
           help="CPUs (torch threads) per actor with --ray (default: 1)")  # fmt: skip
    check.add_model_options(batch)
    check.add_engine_options(batch)


def run_batch_command(args: argparse.Namespace) -> int:
    from ..api.models import configure

    check.configure_model_options(args)
    check.configure_engine(args)
    if args.background_compile is None and not os.environ.get("NANOENGINE_BACKGROUND_COMPILE"):
        configure(background_compile=False)  # it compiles the one-sequence step; a batch runs full width
    if not os.path.isfile(args.input):
        raise InvalidParameterError(f"INPUT {args.input} is not a file")
    sampling = {name: getattr(args, name) for name in BATCH_SAMPLING}
    if args.ray is not None:
        from ..ray.data import run_batch_on_ray  # says which extra to install when ray is missing

        summary = run_batch_on_ray(
            args.model, args.input, args.output, address=args.ray, actors=args.ray_actors,
            threads=args.ray_threads, score=args.score, window=args.window, **sampling,
        )  # fmt: skip
    else:
        from ..api.llm import load

        llm = load(args.model)
        summary = llm.run_batch(
            args.input, args.output, score=args.score, window=args.window, progress=args.progress, **sampling
        )
    logger.info(
        "%s: %d lines answered (%d failed) in %.1f s, %.0f tokens/s; %d were answered before",
        args.output, summary.succeeded + summary.failed, summary.failed, summary.seconds,
        summary.completion_tokens / max(summary.seconds, 1e-9), summary.already_done,
    )  # fmt: skip
    return 0
