"""Decode speed on a CUDA GPU: nanoengine bfloat16 eager, compiled, and compiled with CUDA graphs,
against `transformers` bfloat16, in one run (prepared for a lent GPU machine, run there as is).

    python benchmarks/cuda_bench.py --config weights/smollm2-135m-instruct/config.json --out results/

The weights do not travel to such a machine (they are larger than what may be sent), so the model
is the checkpoint's architecture with random weights, saved once with `transformers` and loaded by
both: speed does not depend on the values. Prompts are token ids; greedy ids are compared between
the systems (random weights make near-ties common, so a difference is reported, not asserted).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from nanoengine import load_model  # noqa: E402
from nanoengine.generation import generate  # noqa: E402


def timed(run, runs: int) -> dict:
    """Tokens per second of `run()` -> (ids, stamps) after one warm-up: median, min, max."""
    ids, _ = run()  # warm-up: compilation, CUDA graph capture
    rates = []
    for _ in range(runs):
        ids, stamps = run()
        rates.append((len(stamps) - 2) / (stamps[-1] - stamps[1]))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "ids": ids}


def first_difference(ids: list[int], others: list[int]) -> str:
    return next((f"no, from token {i}" for i, (a, b) in enumerate(zip(ids, others)) if a != b), "no (length)")


def nanoengine_system(folder: Path, prompt: list[int], new_tokens: int, mode: str | None):
    model = load_model(folder, dtype="bfloat16", device="cuda")
    if mode is not None:  # the one-token step compiled (reduce-overhead: replayed as a CUDA graph)
        model.compile_decode_step(mode)

    def run():
        stamps, ids = [time.perf_counter()], []
        for step in generate(model, prompt, new_tokens, eos_ids=()):
            ids.append(step.id)  # .id synchronises: the token is on the host
            stamps.append(time.perf_counter())
        return ids, stamps

    return run


def transformers_system(folder: Path, prompt: list[int], new_tokens: int):
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    ids_in = torch.tensor([prompt], device="cuda")

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
    args = p.parse_args()
    from torch._dynamo.utils import counters
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.config.parent)).save_pretrained(folder)
    prompt = torch.randint(100, 20000, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    systems = {
        "transformers-bf16": lambda: transformers_system(folder, prompt, args.new_tokens),
        "nanoengine-bf16": lambda: nanoengine_system(folder, prompt, args.new_tokens, None),
        "nanoengine-bf16-compiled": lambda: nanoengine_system(folder, prompt, args.new_tokens, "default"),
        "nanoengine-bf16-cudagraphs": lambda: nanoengine_system(folder, prompt, args.new_tokens, "reduce-overhead"),
    }
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "prompt_tokens": args.prompt_len,
               "new_tokens": args.new_tokens, "runs": args.runs, "weights": "random, the checkpoint's shapes", "systems": {}}  # fmt: skip
    for name, make in systems.items():
        counters.clear()
        results["systems"][name] = timed(make(), args.runs)
        results["systems"][name]["inductor"] = dict(counters["inductor"])  # cudagraph_skips, if any
        print(name, {k: v for k, v in results["systems"][name].items() if k != "ids"}, flush=True)
    base = results["systems"]["transformers-bf16"]
    print(f"{results['device']}, torch {results['torch']}, bfloat16, {args.prompt_len}-token prompt, {args.new_tokens} new tokens, median of {args.runs}")
    eager = results["systems"]["nanoengine-bf16"]
    print("| system | decode tok/s | vs transformers bf16 | ids = transformers' | = ours eager | CUDA graphs skipped |")
    print("|---|---|---|---|---|---|")
    for name, r in results["systems"].items():
        same = ["yes" if r["ids"] == other["ids"] else first_difference(r["ids"], other["ids"]) for other in (base, eager)]
        skips = r["inductor"].get("cudagraph_skips", 0)
        print(f"| {name} | {r['median']:.1f} ({r['min']:.1f}-{r['max']:.1f}) | {r['median'] / base['median']:.2f}x | {same[0]} | {same[1]} | {skips} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda-bench.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
