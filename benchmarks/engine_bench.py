"""Concurrent streams through the public API: what the engine's batching buys, side by side in one run.

    python benchmarks/engine_bench.py                  # eager (the default options) and compiled
    python benchmarks/engine_bench.py --modes eager    # the default options only
    python benchmarks/engine_bench.py --quick          # a smoke run: 1 and 2 streams, 8 tokens, 8 prompts

Each mode runs in its own worker process (its peak memory is its own) and reports:
- for 1, 2, 4, 8, 16 and 32 concurrent `Completion.acreate` streams (greedy, 128 new tokens,
  prompts of 64 to 512 tokens): aggregate tok/s, p50/p95 time to first token and inter-token
  latency, and each level's speed-up over one stream;
- one stream through the single-sequence `generate()` loop, the path every request took before
  the engine, as the reference for "one stream is no slower";
- the largest inter-token gap of 8 running streams while a 2,000-token prompt is admitted;
- `llm.generate` over 256 prompts (32 new tokens), wall time;
- the KV pool's size and the peak resident memory.
transformers' padded batch `generate` on the same 256 prompts runs in a worker of its own, at
batch sizes 16, 32 and 64; its best is the reference. Results go to a table, JSON and a PNG under
`benchmarks/results/`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m-instruct"
TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a screw press into a system that could produce "
    "books quickly and cheaply. Within fifty years presses had spread to more than two hundred cities, "
    "and the price of a book fell so far that ordinary merchants could own a small library. "
)
TRANSFORMERS_BATCHES = (16, 32, 64)


def prompts(tokenizer, count: int, shortest: int, longest: int) -> list[str]:
    """`count` prompts whose lengths spread evenly from `shortest` to `longest` tokens, each a
    different slice of the text so that no two are alike."""
    ids = tokenizer.encode(TEXT * 40, add_special_tokens=False)
    out = []
    for i in range(count):
        n = shortest + (longest - shortest) * i // max(count - 1, 1)
        start = (i * 37) % (len(ids) - n)
        out.append(tokenizer.decode(ids[start : start + n]))
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else float("nan")


async def timed_stream(prompt: str, new_tokens: int, model: str = MODEL) -> tuple[float, list[float]]:
    """(submission time, arrival time of each token) of one greedy stream."""
    from nanoengine import Completion

    start = time.perf_counter()
    stream = await Completion.acreate(
        model, prompt, new_tokens, temperature=0, timeout=3600, stream=True, return_token_log_probs=True
    )  # with log-probs every chunk is one token, so each arrival is timed
    arrivals = []
    async for _ in stream:
        arrivals.append(time.perf_counter())
    return start, arrivals


def concurrency_level(texts: list[str], new_tokens: int, model: str = MODEL) -> dict:
    async def run():
        return await asyncio.gather(*(timed_stream(t, new_tokens, model) for t in texts))

    start = time.perf_counter()
    streams = asyncio.run(run())
    tokens = sum(len(a) for _, a in streams)
    end = max(a[-1] for _, a in streams)
    ttft = [a[0] - s for s, a in streams]
    itl = [b - a for _, arr in streams for a, b in zip(arr, arr[1:])]
    return {
        "streams": len(texts),
        "tokens": tokens,
        "tok_s": tokens / (end - start),
        "ttft_p50_ms": 1000 * percentile(ttft, 0.5),
        "ttft_p95_ms": 1000 * percentile(ttft, 0.95),
        "itl_p50_ms": 1000 * percentile(itl, 0.5),
        "itl_p95_ms": 1000 * percentile(itl, 0.95),
    }


async def _admission(texts: list[str], long_prompt: str, arrivals: dict[int, list[float]]):
    from nanoengine import Completion

    async def running(i: int, text: str) -> None:
        stream = await Completion.acreate(MODEL, text, 400, temperature=0, timeout=3600, stream=True, return_token_log_probs=True)
        arrivals[i] = []
        async for _ in stream:
            arrivals[i].append(time.perf_counter())

    tasks = [asyncio.ensure_future(running(i, t)) for i, t in enumerate(texts)]
    while len(arrivals) < len(texts) or min(len(a) for a in arrivals.values()) < 5:
        await asyncio.sleep(0.05)
    admitted_at = time.perf_counter()
    _, newcomer = await timed_stream(long_prompt, 1)
    first_token = newcomer[0]
    await asyncio.sleep(0.5)  # a few more steps after it
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return admitted_at, first_token, None


def solo_loop(llm, prompt: str, new_tokens: int) -> float:
    """tok/s of one stream through `generate()`, the single-sequence loop (the pre-engine path)."""
    from nanoengine import SamplingParams, generate

    ids = llm.tokenizer.encode(prompt)
    start = time.perf_counter()
    count = sum(1 for _ in generate(llm.model, ids, new_tokens, SamplingParams(temperature=0), eos_ids=()))
    return count / (time.perf_counter() - start)


def nanoengine_worker(mode: str, args: argparse.Namespace) -> dict:
    import torch

    import nanoengine
    from nanoengine.engine.runner import LENGTH_BUCKET

    # Rows for the largest level, and for 8 streams plus the newcomer of the admission test.
    # "eager" stays eager throughout: the default background compile would start after 256 tokens
    # and take the CPUs from the levels being measured.
    nanoengine.configure(compile=mode == "compiled", background_compile=mode != "eager", max_batch_size=max(*args.streams, 9))
    start = time.perf_counter()
    llm = nanoengine.load(MODEL)
    load_s = time.perf_counter() - start
    tok = llm.tokenizer
    start = time.perf_counter()
    for n in sorted(set(args.streams)):  # warm-up: every batch size once
        concurrency_level(prompts(tok, n, 16, 32), 4)
    if mode == "compiled":  # one stream at each cache length the levels reach, then wait for the compiles
        lengths = range(LENGTH_BUCKET, 512 + args.new_tokens + LENGTH_BUCKET, LENGTH_BUCKET)
        for length in lengths:
            concurrency_level(prompts(tok, 1, length - 16, length - 16), 24)
        while not all(n in llm.engine.compiler.compiled for n in lengths):
            time.sleep(1)
    warmup_s = time.perf_counter() - start
    result = {
        "mode": mode,
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "warmup_s": warmup_s,
        "solo_loop_tok_s": solo_loop(llm, prompts(tok, 1, 256, 256)[0], args.new_tokens),
        "levels": [concurrency_level(prompts(tok, n, 64, 512), args.new_tokens) for n in args.streams],
        "kv_pool_mb": llm.engine.kv_cache_bytes / 2**20,
        "max_batch_size": llm.engine.settings.max_batch_size,
        "max_seq_len": llm.engine.max_seq_len,
    }
    result["admission"] = _admission_gap(tok, args.long_prompt)
    batch = prompts(tok, args.batch_prompts, 16, 64)
    start = time.perf_counter()
    outs = llm.generate(batch, max_new_tokens=args.batch_new_tokens, temperature=0, progress=False)
    result["generate_256_s"] = time.perf_counter() - start
    result["generate_prompts"] = len(batch)
    result["generate_256_tokens"] = sum(o.num_completion_tokens for o in outs)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _admission_gap(tokenizer, long_len: int) -> dict:
    texts = prompts(tokenizer, 8, 64, 128)
    long_prompt = prompts(tokenizer, 1, long_len, long_len)[0]
    arrivals: dict[int, list[float]] = {}
    admitted_at, first_token, _ = asyncio.run(_admission(texts, long_prompt, arrivals))
    during, before = [], []
    for times in arrivals.values():
        for a, b in zip(times, times[1:]):
            (during if b > admitted_at and a < first_token else before).append(b - a)
    return {
        "prompt_tokens": long_len,
        "admission_s": first_token - admitted_at,
        "largest_gap_ms": 1000 * max(during, default=float("nan")),
        "itl_p50_before_ms": 1000 * percentile(before, 0.5),
    }


def transformers_worker(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanoengine import Tokenizer, resolve_model

    folder = resolve_model(MODEL)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder)
    hf_tok.padding_side = "left"
    hf_tok.pad_token = hf_tok.pad_token or hf_tok.eos_token
    batch = prompts(Tokenizer.from_folder(folder), args.batch_prompts, 16, 64)
    times = {size: padded_generate_s(model, hf_tok, batch, size, args.batch_new_tokens) for size in args.transformers_batches}
    best = min(times, key=times.get)
    return {
        "mode": "transformers",
        "threads": torch.get_num_threads(),
        "generate_256_s_by_batch": times,
        "best_batch": best,
        "generate_256_s": times[best],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def padded_generate_s(model, hf_tok, batch: list[str], size: int, new_tokens: int) -> float:
    """Seconds for transformers' greedy `generate` over `batch`, `size` prompts at a time, each
    batch left-padded to its longest prompt (the tokenizer pads on the left)."""
    import torch

    start = time.perf_counter()
    for i in range(0, len(batch), size):
        encoded = hf_tok(batch[i : i + size], return_tensors="pt", padding=True).to(model.device)
        with torch.inference_mode():
            model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False, pad_token_id=hf_tok.pad_token_id)
    return time.perf_counter() - start


def run_worker(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", name, *sys.argv[1:]]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def others_running() -> str:
    """What else was using the CPU when the run started (the 1-minute load average, and the busiest processes)."""
    load = os.getloadavg()[0]
    top = subprocess.run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True).stdout.splitlines()[1:6]
    return f"load average {load:.2f}; busiest: " + "; ".join(" ".join(line.split()) for line in top)


def table(results: list[dict], reference: dict | None) -> str:
    lines = []
    for r in results:
        one = r["levels"][0]["tok_s"]
        lines.append(
            f"\n### nanoengine {r['mode']} ({r['threads']} threads; {r['max_batch_size']} rows of {r['max_seq_len']} "
            f"tokens, KV pool {r['kv_pool_mb']:.0f} MB; peak RSS {r['peak_rss_mb']:.0f} MB; load {r['load_s']:.1f} s, "
            f"warm-up {r['warmup_s']:.1f} s)\n"
        )
        lines.append("| streams | tok/s | vs 1 stream | TTFT p50 / p95 ms | ITL p50 / p95 ms |")
        lines.append("|---|---|---|---|---|")
        for level in r["levels"]:
            lines.append(
                f"| {level['streams']} | {level['tok_s']:.1f} | **{level['tok_s'] / one:.2f}x** | "
                f"{level['ttft_p50_ms']:.0f} / {level['ttft_p95_ms']:.0f} | {level['itl_p50_ms']:.0f} / {level['itl_p95_ms']:.0f} |"
            )
        lines.append(
            f"\none stream through the engine: {one:.1f} tok/s; through the single-sequence loop (the pre-engine "
            f"path): {r['solo_loop_tok_s']:.1f} tok/s (**{one / r['solo_loop_tok_s']:.2f}x**)"
        )
        gap = r["admission"]
        lines.append(
            f"a {gap['prompt_tokens']}-token prompt admitted beside 8 streams: first token after {gap['admission_s']:.1f} s; "
            f"the streams' largest gap meanwhile {gap['largest_gap_ms']:.0f} ms (their median gap before: "
            f"{gap['itl_p50_before_ms']:.0f} ms)"
        )
        ratio = f" (**{reference['generate_256_s'] / r['generate_256_s']:.2f}x** transformers)" if reference else ""
        lines.append(
            f"llm.generate over {r['generate_prompts']} prompts: {r['generate_256_s']:.1f} s, "
            f"{r['generate_256_tokens']} tokens{ratio}"
        )
    if reference:
        by_batch = ", ".join(f"batch {b}: {s:.1f} s" for b, s in reference["generate_256_s_by_batch"].items())
        lines.append(f"\ntransformers padded batch generate, the same prompts: {by_batch}; best batch {reference['best_batch']}")
    return "\n".join(lines)


def chart(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'nanoengine[bench]'): no PNG written", file=sys.stderr)
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        streams = [level["streams"] for level in r["levels"]]
        left.plot(streams, [level["tok_s"] for level in r["levels"]], marker="o", label=f"nanoengine {r['mode']}")
        right.plot(streams, [level["itl_p50_ms"] for level in r["levels"]], marker="o", label=f"{r['mode']} p50")
        right.plot(streams, [level["itl_p95_ms"] for level in r["levels"]], marker="x", linestyle="--", label=f"{r['mode']} p95")
    for axis, label in ((left, "aggregate tok/s"), (right, "inter-token latency, ms")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent streams")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle("SmolLM2-135M through Completion.acreate, 128 new tokens per stream")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="eager,compiled", help="nanoengine modes, of eager,compiled")
    parser.add_argument("--streams", default="1,2,4,8,16,32", help="concurrency levels")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--long-prompt", type=int, default=2000, help="tokens of the prompt admitted beside 8 streams")
    parser.add_argument("--batch-prompts", type=int, default=256)
    parser.add_argument("--batch-new-tokens", type=int, default=32)
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers' batch generate")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 and 2 streams, 8 tokens, 8 prompts")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "engine-cpu.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.streams = [int(n) for n in args.streams.split(",")]
    args.transformers_batches = TRANSFORMERS_BATCHES
    if args.quick:
        args.streams, args.new_tokens, args.long_prompt = [1, 2], 8, 300
        args.batch_prompts, args.batch_new_tokens, args.transformers_batches = 8, 4, (4, 8)
        args.modes = "eager"
    if args.worker:
        result = transformers_worker(args) if args.worker == "transformers" else nanoengine_worker(args.worker, args)
        print(json.dumps(result))
        return
    context = others_running()
    results = [run_worker(mode, args) for mode in args.modes.split(",")]
    reference = None if args.no_transformers else run_worker("transformers", args)
    import torch

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "running_beside": context,
        "nanoengine": results,
        "transformers": reference,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    text = table(results, reference)
    print(f"{report['machine']}, torch {report['torch']}; at the start: {context}{text}")
    png = args.out.with_suffix(".png")
    if chart(results, png):
        print(f"\nwrote {args.out} and {png}")


if __name__ == "__main__":
    main()
