"""The `nanoengine` command line (also `python -m nanoengine`).

Exit codes: 0 success, 2 a usage error (a bad option or parameter value), 1 any other failure,
130 interrupted by Ctrl-C. Expected errors print one line, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import NoReturn

from . import options as check
from .batch import add_batch_command, run_batch_command
from .chat import add_chat_command, run_chat
from .inspect import add_inspect, run_inspect
from .serve_ray import add_serve_on_ray, run_serve_on_ray
from ..errors import InvalidParameterError, NanoEngineError
from ..weights.fetch import is_checkpoint
from ..weights.registry import DEFAULT_MODEL, REGISTRY, fetch_model, registered_folder, weights_root

logger = logging.getLogger("nanoengine")

COMPLETE_SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop_sequences", "timeout")
BENCH_SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "bench.py"
EXAMPLES = """examples:
  nanoengine complete --chat "What is the capital of France?"
  echo "Once upon a time" | nanoengine complete --temperature 0.7 --seed 1
  nanoengine serve --port 5005          # then: LLM_ENGINE_BASE_PATH=http://127.0.0.1:5005/
  nanoengine models
  nanoengine inspect "The capital of France is" --png lens.png
"""


class Parser(argparse.ArgumentParser):
    """Usage errors in one line (the usage itself is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="nanoengine",
        description="Run small language models locally: complete prompts, or serve LLM Engine's REST API.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail to stderr")
    parser.add_argument("--version", action="version", version=f"%(prog)s {check.nanoengine_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_complete(commands)
    add_inspect(commands)
    add_chat_command(commands)
    add_serve(commands)
    add_batch_command(commands)
    fetch_cmd = commands.add_parser(
        "fetch", help="download and convert a registered model's weights", description=fetch_description()
    )
    fetch_cmd.add_argument("model", nargs="?", default=DEFAULT_MODEL, choices=sorted(REGISTRY), help="registered name")
    commands.add_parser(
        "models",
        help="list the registered models and the checkpoints present, with sizes and folders",
        description=f"Lists registered models and checkpoint folders under {weights_root()} "
        "(set $NANOENGINE_WEIGHTS_DIR to keep them elsewhere).",
    )
    commands.add_parser(
        "bench",
        help="run the benchmarks (nanoengine bench --help for their options)",
        add_help=False,  # --help goes to the benchmark script, which names itself `nanoengine bench`
        prefix_chars="\0",  # every argument goes to the benchmark script
    ).add_argument("bench_args", nargs="*", metavar="ARG")
    add_eval(commands)
    return parser


def add_eval(commands: argparse._SubParsersAction) -> None:
    commands.add_parser(
        "eval",
        help="evaluate a model with lm-evaluation-harness (lm-eval run's options; --model is nanoengine)",
        add_help=False,  # --help goes to lm-eval, whose options these are
        prefix_chars="\0",  # every argument goes to lm-eval
    ).add_argument("eval_args", nargs="*", metavar="ARG")


def add_complete(commands: argparse._SubParsersAction) -> None:
    complete = commands.add_parser(
        "complete",
        help="complete a prompt, streaming the text as it comes",
        description="Complete a prompt with a local model. The text goes to stdout as it is generated; "
        "token counts and speed go to stderr. Ctrl-C stops the generation.",
    )
    complete.add_argument("prompt", nargs="?", help="the prompt (read from stdin when left out)")
    option = complete.add_argument
    option("--model", default=DEFAULT_MODEL, help=f"registered name or checkpoint folder (default: {DEFAULT_MODEL})")
    option("--chat", action="store_true", help="wrap the prompt as a user message in the model's chat template")
    check.add_sampling_options(complete, COMPLETE_SAMPLING)
    option("--no-stream", action="store_true", help="print the whole completion at the end instead")
    check.add_model_options(complete)


def add_serve(commands: argparse._SubParsersAction) -> None:
    from ..server.app import DEFAULT_HOST, DEFAULT_PORT
    from ..server.common import DEFAULT_MAX_CONNECTIONS, DEFAULT_RECEIVE_TIMEOUT, DEFAULT_REQUEST_TIMEOUT

    serve = commands.add_parser(
        "serve",
        help="serve LLM Engine's REST API, for the llmengine client and curl",
        description="Serve LLM Engine's v1 REST API. Existing code using the llmengine client works "
        "unchanged with LLM_ENGINE_BASE_PATH=http://HOST:PORT/ set. Needs the server extra: "
        "pip install 'nanoengine[server]'.",
    )
    option = serve.add_argument
    option("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST}, this machine only)")
    option("--port", type=check.port_number, default=DEFAULT_PORT, help=f"0 picks a free one (default: {DEFAULT_PORT})")
    option("--api-key", type=check.api_key, metavar="KEY", help="require this key (default: $NANOENGINE_API_KEY, or none)")
    option(
        "--models", nargs="+", metavar="MODEL",
        help=f"what to serve: registered names, checkpoint folders, or NAME=FOLDER (default: {DEFAULT_MODEL})",
    )  # fmt: skip
    option(
        "--request-timeout", type=check.positive_seconds, default=DEFAULT_REQUEST_TIMEOUT, metavar="SECONDS",
        help=f"longest a request may take (default: {DEFAULT_REQUEST_TIMEOUT:g})",
    )  # fmt: skip
    option(
        "--receive-timeout", type=check.positive_seconds, default=DEFAULT_RECEIVE_TIMEOUT, metavar="SECONDS",
        help=f"longest a client may take to send a request, headers and body (default: {DEFAULT_RECEIVE_TIMEOUT:g})",
    )  # fmt: skip
    option(
        "--max-connections", type=check.positive_int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
        help=f"most connections open at once (default: {DEFAULT_MAX_CONNECTIONS}; fewer if the open-files limit is low)",
    )  # fmt: skip
    option(
        "--allow-host", action="append", metavar="NAME",
        help="accept requests for this Host name too (repeat for several; * for any). Bound to loopback, "
        "the server answers loopback names only, against DNS rebinding; bound elsewhere, any name",
    )  # fmt: skip
    check.add_model_options(serve)
    check.add_engine_options(serve)
    add_serve_on_ray(serve)


def fetch_description() -> str:
    return "Downloads a registered model's weights and converts them into a checkpoint folder. " + " ".join(
        f"{name}: {model.description} (licence: {model.source.license})." for name, model in REGISTRY.items()
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log_format = "%(asctime)s %(levelname)s %(message)s" if args.command == "serve" else "%(message)s"
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=log_format, stream=sys.stderr)
    run = {
        "complete": run_complete, "chat": run_chat, "serve": run_serve, "inspect": run_inspect,
        "fetch": run_fetch, "models": run_models, "bench": run_bench, "eval": run_eval,
        "batch": run_batch_command,
    }  # fmt: skip
    try:
        return run[args.command](args)
    except InvalidParameterError as err:
        print(f"nanoengine {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (NanoEngineError, TimeoutError) as err:
        print(f"nanoengine: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nnanoengine: interrupted", file=sys.stderr)
        return 130


def run_complete(args: argparse.Namespace) -> int:
    from ..api.completion import Completion
    from ..api.models import configure, get_model

    check.configure_model_options(args)
    if not os.environ.get("NANOENGINE_BACKGROUND_COMPILE"):
        configure(background_compile=False)  # a one-shot completion ends before a compile would pay off
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    params = {name: getattr(args, name) for name in COMPLETE_SAMPLING}
    check.check_sampling_options(args.model, prompt, params)
    if args.chat:
        check.check_chat_template(args.model)
    loaded = get_model(args.model)  # loaded before the clock starts: the speed shown is the model's
    if args.chat:
        from ..api.chat import chat_prompt  # the prompt that llm.chat() builds: one path for every chat surface

        prompt = chat_prompt(loaded.tokenizer, [{"role": "user", "content": prompt}])
    start, first, held = time.perf_counter(), None, []
    with closing(Completion.create(args.model, prompt, stream=True, **params)) as stream:
        for chunk in stream:
            first = first or time.perf_counter()  # the prompt's pass ends with the first token
            if args.no_stream:
                held.append(chunk.output.text)
            else:
                sys.stdout.write(chunk.output.text)
                sys.stdout.flush()
    sys.stdout.write("".join(held) + "\n")
    report_speed(chunk.output.num_prompt_tokens, chunk.output.num_completion_tokens, start, first)
    return 0


def report_speed(prompt_tokens: int | None, new_tokens: int | None, start: float, first: float | None) -> None:
    """Token counts, and the prompt's pass and the decoding timed apart (their speeds differ tenfold)."""
    end = time.perf_counter()
    line = f"[{prompt_tokens} prompt tokens, {new_tokens} new tokens"
    if first is not None and prompt_tokens:
        line += f"; prompt pass and first token {first - start:.2f} s ({prompt_tokens / (first - start):.0f} tokens/s)"
        if new_tokens and new_tokens > 1 and end > first:
            line += f", then decoding at {(new_tokens - 1) / (end - first):.1f} tokens/s"
    logger.info("%s]", line)


def run_serve(args: argparse.Namespace) -> int:
    from ..server.app import preload, serve
    from ..server.common import ServerSettings, served_models

    check.configure_model_options(args)
    check.configure_engine(args)
    settings = ServerSettings(
        models=served_models(args.models),
        api_key=args.api_key if args.api_key is not None else check.api_key_from_environment(),
        request_timeout=args.request_timeout,
        receive_timeout=args.receive_timeout,
        max_connections=args.max_connections,
        allowed_hosts=tuple(args.allow_host or ()),
    )
    if args.ray is not None:
        return run_serve_on_ray(args, settings)
    preload(settings)
    serve(settings, host=args.host, port=args.port)
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    print(fetch_model(args.model))
    return 0


def run_models(args: argparse.Namespace) -> int:
    """One line per model: name, state, size, folder, description (tab-separated)."""
    print("\t".join(["NAME", "STATE", "SIZE", "FOLDER", "DESCRIPTION"]))
    for name, model in REGISTRY.items():
        folder = registered_folder(name)
        present = is_checkpoint(folder)
        state, size = (presence(folder), folder_size(folder)) if present else ("not fetched", "-")
        print(f"{name}\t{state}\t{size}\t{folder}\t{model.description} (licence: {model.source.license})")
    for folder in unregistered_checkpoints():
        print(f"{folder.name}\t{presence(folder)}\t{folder_size(folder)}\t{folder}\tunregistered: use its path as the model")


def presence(checkpoint: Path) -> str:
    """`present`, or which of its files this user may not read."""
    unreadable = sorted(f.name for f in checkpoint.iterdir() if f.is_file() and not os.access(f, os.R_OK))
    return f"present, unreadable: {', '.join(unreadable)}" if unreadable else "present"
    return 0


def unregistered_checkpoints() -> Iterator[Path]:
    root = weights_root()
    if root.is_dir():
        yield from (f for f in sorted(root.iterdir()) if f.name not in REGISTRY and f.is_dir() and is_checkpoint(f))


def folder_size(folder: Path) -> str:
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return f"{size / 2**20:.0f} MiB"


def run_bench(args: argparse.Namespace) -> int:
    """Run `benchmarks/bench.py`, which lives in the source checkout, not in an installed package."""
    if not BENCH_SCRIPT.is_file():
        raise NanoEngineError(f"the benchmarks come with the source checkout only ({BENCH_SCRIPT} is missing)")
    spec = importlib.util.spec_from_file_location("nanoengine_bench", BENCH_SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench.main(args.bench_args, prog="nanoengine bench")


def run_eval(args: argparse.Namespace) -> int:
    """`lm-eval run --model nanoengine ARGS...`, in this process, with nanoengine's model registered."""
    try:
        from lm_eval.__main__ import cli_evaluate

        from ..evaluation import harness  # noqa: F401  (registers the model `nanoengine`)
    except ImportError as err:
        raise NanoEngineError(f"nanoengine eval needs lm-eval: pip install 'nanoengine[eval]' ({err})") from None
    argv = sys.argv
    sys.argv = ["nanoengine eval", "run", "--model", "nanoengine", *args.eval_args]  # lm-eval reads sys.argv
    try:
        cli_evaluate()
    except SystemExit as exit_:  # lm-eval's usage errors and --help
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    return 0
