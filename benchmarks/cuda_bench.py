"""Decode speed on a CUDA GPU: nanoengine bfloat16 eager, compiled, and compiled with CUDA graphs,
and its engine (the serving loop) eager, replaying CUDA graphs (its default there) and compiled,
against `transformers` bfloat16, in one run (prepared for a lent GPU machine, run there as is).

    python benchmarks/cuda_bench.py --config weights/smollm2-135m-instruct/config.json --out results/
    python benchmarks/cuda_bench.py --config ... --systems transformers-bf16,engine-bf16   # some of them
    python benchmarks/cuda_bench.py --config ... --device cpu --runs 1 --new-tokens 8   # a smoke run

The weights do not travel to such a machine (they are larger than what may be sent), so the model
is the checkpoint's architecture with random weights, saved once with `transformers` and loaded by
both: speed does not depend on the values. Prompts are token ids; greedy ids are compared between
the systems (random weights make near-ties common, so a difference is reported, not asserted).
The engine takes text: the prompt is those ids decoded with the checkpoint's tokenizer (copied
beside the random weights), and its tokens are compared with the eager engine's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from nanoengine import load_model  # noqa: E402
from nanoengine.engine.compiling import compile_steps  # noqa: E402
from nanoengine.engine.generation import generate  # noqa: E402
from report import spread  # noqa: E402  (benchmarks/report.py, beside this script)


def timed(run, runs: int) -> dict:
    """Tokens per second of `run()` -> (ids, stamps) after one warm-up: median, min, max, runs."""
    ids, _ = run()  # warm-up: compilation, CUDA graph capture
    rates = []
    for _ in range(runs):
        ids, stamps = run()
        rates.append((len(stamps) - 2) / (stamps[-1] - stamps[1]))
    return {**spread(rates), "ids": ids}


def first_difference(ids: list[int], others: list[int]) -> str:
    return next((f"no, from token {i}" for i, (a, b) in enumerate(zip(ids, others)) if a != b), "no (length)")


def nanoengine_system(folder: Path, prompt: list[int], new_tokens: int, device: str, mode: str | None):
    model = load_model(folder, dtype="bfloat16", device=device)
    if mode is not None:  # the one-token step compiled (reduce-overhead: replayed as a CUDA graph)
        compile_steps(model, mode)

    def run():
        stamps, ids = [time.perf_counter()], []
        for step in generate(model, prompt, new_tokens, eos_ids=()):
            ids.append(step.id)  # .id synchronises: the token is on the host
            stamps.append(time.perf_counter())
        return ids, stamps

    return run


def engine_system(
    folder: Path, prompt: str, new_tokens: int, device: str, compiled: bool, graphs: bool = True, wait_s: float = 600
):
    """The engine through `llm.complete`; `compiled`: its one-row step compiled in the background
    from the first step on (configure(compile=True)), measured once the compiled step is in use;
    else eager, with its steps replayed as CUDA graphs when `graphs` (the default on a GPU)."""
    import nanoengine

    nanoengine.configure(dtype="bfloat16", device=device, compile=compiled, background_compile=compiled, cuda_graphs=graphs)
    llm = nanoengine.load(folder)

    def run():
        stamps, tokens = [time.perf_counter()], []
        for chunk in llm.complete(prompt, stream=True, max_new_tokens=new_tokens, temperature=0, return_token_log_probs=True):
            tokens.append(chunk.token.token)  # one chunk per token (log-probs asked for)
            stamps.append(time.perf_counter())
        return tokens, stamps

    compiler, end = llm.engine.compiler, time.monotonic() + wait_s
    while compiled and not compiler.compiled and not compiler.failed and time.monotonic() < end:
        run()
    assert not compiled or compiler.compiled, f"the background compile failed or took over {wait_s:.0f} s (see the log)"
    return run


def transformers_system(folder: Path, prompt: list[int], new_tokens: int, device: str):
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    ids_in = torch.tensor([prompt], device=device)

    def run():
        stamps, ids = [time.perf_counter()], []

        class Stamper(BaseStreamer):
            def put(self, value) -> None:
                if value.ndim == 1:
                    ids.append(int(value[0]))
                    stamps.append(time.perf_counter())

            def end(self) -> None:
                pass

        with torch.inference_mode():
            model.generate(ids_in, attention_mask=torch.ones_like(ids_in), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=Stamper())  # fmt: skip
        return ids, stamps

    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, required=True, help="the checkpoint's config.json")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--device", default="cuda")
    p.add_argument("--systems", default="", help="a comma-separated subset of the systems (default: all)")
    args = p.parse_args()
    from torch._dynamo.utils import counters
    from transformers import AutoConfig, AutoModelForCausalLM

    from nanoengine import Tokenizer

    folder = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.config.parent)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(args.config.parent / name, folder / name)
    prompt = torch.randint(100, 20000, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    text = Tokenizer.from_folder(folder).decode(prompt)
    n, device = args.new_tokens, args.device
    systems = {  # name: (make, the system its tokens are compared with)
        "transformers-bf16": (lambda: transformers_system(folder, prompt, n, device), None),
        "nanoengine-bf16": (lambda: nanoengine_system(folder, prompt, n, device, None), "transformers-bf16"),
        "nanoengine-bf16-compiled": (lambda: nanoengine_system(folder, prompt, n, device, "default"), "nanoengine-bf16"),
        "nanoengine-bf16-cudagraphs": (lambda: nanoengine_system(folder, prompt, n, device, "reduce-overhead"), "nanoengine-bf16"),
        "engine-bf16-eager": (lambda: engine_system(folder, text, n, device, False, graphs=False), None),
        "engine-bf16": (lambda: engine_system(folder, text, n, device, False), "engine-bf16-eager"),
        "engine-bf16-background-compiled": (lambda: engine_system(folder, text, n, device, True), "engine-bf16-eager"),
    }
    if args.systems:
        unknown = set(args.systems.split(",")) - set(systems)
        if unknown:
            p.error(f"unknown system(s) {', '.join(sorted(unknown))}; known: {', '.join(systems)}")
        systems = {name: systems[name] for name in args.systems.split(",")}
    name_of = torch.cuda.get_device_name() if device == "cuda" else device
    results = {"device": name_of, "torch": torch.__version__, "prompt_tokens": args.prompt_len,
               "new_tokens": args.new_tokens, "runs": args.runs, "weights": "random, the checkpoint's shapes", "systems": {}}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (make, _) in systems.items():
        counters.clear()
        try:
            results["systems"][name] = timed(make(), args.runs)
        except Exception as err:  # one system's failure must not cost the others' figures (a GPU is lent briefly)
            print(name, "failed:", repr(err), flush=True)
            continue
        results["systems"][name]["inductor"] = dict(counters["inductor"])  # cudagraph_skips, if any
        print(name, {k: v for k, v in results["systems"][name].items() if k != "ids"}, flush=True)
        (args.out / "cuda-bench.json").write_text(json.dumps(results, indent=1))  # as it goes
    base = results["systems"].get("transformers-bf16", {}).get("median")
    print(f"{results['device']}, torch {results['torch']}, bfloat16, {args.prompt_len}-token prompt, {args.new_tokens} new tokens, median of {args.runs}")
    print("| system | decode tok/s | vs transformers bf16 | tokens = those of | CUDA graphs skipped |")
    print("|---|---|---|---|---|")
    for name, r in results["systems"].items():
        other = systems[name][1]
        same = "-" if other not in results["systems"] else f"{other}: " + ("yes" if r["ids"] == results["systems"][other]["ids"] else first_difference(r["ids"], results["systems"][other]["ids"]))
        skips = r["inductor"].get("cudagraph_skips", 0)
        ratio = f"{r['median'] / base:.2f}x" if base else "-"
        print(f"| {name} | {r['median']:.1f} ({r['min']:.1f}-{r['max']:.1f}) | {ratio} | {same} | {skips} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
