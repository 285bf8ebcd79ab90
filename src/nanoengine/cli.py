"""The `nanoengine` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from .errors import NanoEngineError
from .registry import DEFAULT_MODEL, REGISTRY, fetch_model, registered_folder, resolve_model
from .fetch import is_checkpoint

logger = logging.getLogger("nanoengine")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoengine", description="Run small language models locally.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    complete = commands.add_parser("complete", help="complete a prompt, streaming the text as it comes")
    complete.add_argument("prompt", nargs="?", help="the prompt (read from stdin when left out)")
    complete.add_argument("--model", default=DEFAULT_MODEL, help=f"registered name or checkpoint folder (default: {DEFAULT_MODEL})")
    complete.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the model's chat template")
    complete.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    complete.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    complete.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    complete.add_argument("--top-p", type=float, default=None, help="sample from the smallest set reaching probability p")
    complete.add_argument("--seed", type=int, default=None, help="random seed, for repeatable sampling")
    complete.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights' dtype")
    complete.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")

    fetch_cmd = commands.add_parser("fetch", help="download and convert a registered model's weights")
    fetch_cmd.add_argument("model", nargs="?", default=DEFAULT_MODEL, choices=sorted(REGISTRY), help="registered model name")

    commands.add_parser("models", help="list the registered models and whether they are present")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return {"complete": run_complete, "fetch": run_fetch, "models": run_models}[args.command](args)
    except NanoEngineError as err:
        print(f"nanoengine: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nnanoengine: interrupted", file=sys.stderr)
        return 130


def run_complete(args: argparse.Namespace) -> int:
    from .generation import generate
    from .loading import load_model
    from .sampling import SamplingParams
    from .tokenizer import IncrementalDetokenizer, Tokenizer

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    folder = resolve_model(args.model)
    model = load_model(folder, dtype=args.dtype, device=args.device)
    tokenizer = Tokenizer.from_folder(folder)
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    prompt_ids = tokenizer.encode(prompt)
    detokenizer = IncrementalDetokenizer(tokenizer)
    start, count = time.perf_counter(), 0
    for token in generate(model, prompt_ids, args.max_new_tokens, sampling):
        count += 1
        sys.stdout.write(detokenizer.add(token.id))
        sys.stdout.flush()
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    logger.info("[%d prompt tokens, %d new tokens, %.1f tokens/s]", len(prompt_ids), count, count / elapsed)
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    print(fetch_model(args.model))
    return 0


def run_models(args: argparse.Namespace) -> int:
    for name, model in REGISTRY.items():
        folder = registered_folder(name)
        state = "present" if is_checkpoint(folder) else "not fetched"
        print(f"{name}\t{state}\t{folder}\t{model.description} (licence: {model.source.license})")
    return 0
