"""Research-scale throughput, side by side in one run: `llm.generate` and `llm.score` against
transformers, concurrent streams, quantized batches, compile cost. Each target with met/NOT met.

    python benchmarks/throughput_bench.py                 # the issue's sizes (an hour or more on 2 cores)
    python benchmarks/throughput_bench.py --prompts 64 --texts 200 --stream-tokens 32   # a shorter run
    python benchmarks/throughput_bench.py --quick         # a smoke run
    python benchmarks/throughput_bench.py --device cuda --dtypes bfloat16 --random-weights   # on a GPU

On a GPU (`--device cuda`) nanoengine replays its decode steps as CUDA graphs and transformers runs
in bfloat16 too. `--random-weights` gives both systems the model's architecture with random
weights (seeded) and its tokenizer, for a machine the weights cannot be sent to: speed does not
depend on the values, but greedy texts then hinge on near-ties, so their comparisons say little.

Every system runs in a worker process of its own (its memory and threads its own), float32 and
the default options unless said (32 rows for 32 streams; the background compile off, timed apart):
- `llm.generate` over prompts of 16-256 tokens (64 new, greedy), wall time; some of its texts
  checked against nanoengine's own single-sequence greedy `generate()`;
- `llm.score` over texts of 32-512 tokens, wall time and every log-prob;
- one, 8 and 32 streams through `Completion.acreate` (tok/s), and one stream through `generate()`
  (the same prompt as one stream's, alternated with it, medians of 3);
- int8 and int4: `llm.generate` on the same prompts, texts compared with float32's;
- transformers: padded batch `generate` and a batched forward (log-softmax) at batch sizes 16,
  32 and 64, in the prompts' own order; its best is the reference;
- the compile cost of the decode buckets in a fresh process with an empty inductor cache, then
  with that cache warm.
Results go to a table (stdout), JSON and a PNG under `benchmarks/results/`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import MODEL, TEXT, concurrency_level, others_running, padded_generate_s, prompts  # noqa: E402
from report import RESULTS_DIR, cpu_ticks  # noqa: E402

BATCHES = (16, 32, 64)
SOLO_ROUNDS = 3  # alternated rounds of one stream against the single-sequence loop


def texts_of(tokenizer, count: int, shortest: int, longest: int) -> list[str]:
    """`count` texts of `shortest` to `longest` tokens, shuffled (a fixed order) so that batches
    taken in the given order mix lengths, as a researcher's list does."""
    out = prompts(tokenizer, count, shortest, longest)
    return [out[(i * 7919) % count] for i in range(count)] if count % 7919 else out


def nanoengine_worker(dtype: str, args: argparse.Namespace) -> dict:
    import torch

    import nanoengine

    # 32 streams at once; no background compile: on CPU it compiles one-row steps only, which batch
    # work does not run, and it would take the CPUs from the measurements (its cost: compile_worker)
    nanoengine.configure(dtype=dtype, device=args.device, max_batch_size=32, background_compile=False)
    llm = nanoengine.load(args.model)
    tok = llm.tokenizer
    batch = texts_of(tok, args.prompts, 16, 256)
    llm.generate(batch[:4], max_new_tokens=4, temperature=0, progress=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(batch, max_new_tokens=args.new_tokens, temperature=0, progress=False)
    result = {"dtype": dtype, "threads": torch.get_num_threads(), "generate_s": time.perf_counter() - start}
    result["texts"] = [o.text for o in outs]
    result["generated_tokens"] = sum(o.num_completion_tokens for o in outs)
    graphs = llm.engine.runner.graphs
    if graphs is not None:
        result["cuda_graphs"] = {"recorded": sorted(graphs.graphs), "failed": graphs.failed}
    if dtype != args.dtypes.split(",")[0]:
        return result
    checked = range(0, len(batch), max(len(batch) // args.solo_checks, 1))
    result["solo_checked"] = [i for i in checked if solo_text(llm, batch[i], args.new_tokens) == outs[i].text]
    result["solo_checks"] = len(checked)
    texts = texts_of(tok, args.texts, 32, 512)
    start = time.perf_counter()
    scored = llm.score(texts)
    result["score_s"] = time.perf_counter() - start
    result["score_tokens"] = sum(len(s.token_ids) for s in scored)
    result["logprobs"] = [s.token_logprobs for s in scored]
    result["streams"] = streams(llm, args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def solo_text(llm, prompt: str, new_tokens: int) -> str:
    from nanoengine import SamplingParams, generate

    ids = [step.id for step in generate(llm.model, llm.tokenizer.encode(prompt), new_tokens, SamplingParams(temperature=0))]
    return llm.tokenizer.decode(ids)


def streams(llm, args: argparse.Namespace) -> dict:
    """tok/s of 1, 8 and 32 streams (prompts of 64-512 tokens), and of one through `generate()`.

    One stream and the single-sequence loop run the same prompt (the 1-stream level's), in
    `SOLO_ROUNDS` alternated rounds, and their medians compare: single runs of different prompts
    had the stream 16% behind the loop where alternated runs of one prompt put it within 2%."""
    from nanoengine import SamplingParams, generate

    text = prompts(llm.tokenizer, 1, 64, 512)[0]
    ids = llm.tokenizer.encode(text)
    solo, one = [], []
    for _ in range(SOLO_ROUNDS):
        start = time.perf_counter()
        count = sum(1 for _ in generate(llm.model, ids, args.stream_tokens, SamplingParams(temperature=0), eos_ids=()))
        solo.append(count / (time.perf_counter() - start))
        one.append(concurrency_level([text], args.stream_tokens, args.model)["tok_s"])
    levels = {"solo_loop": statistics.median(solo), "1": statistics.median(one), "solo_loop_runs": solo, "1_runs": one}
    for n in args.streams:
        if n != 1:
            levels[str(n)] = concurrency_level(prompts(llm.tokenizer, n, 64, 512), args.stream_tokens, args.model)["tok_s"]
    return levels


def transformers_worker(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanoengine import Tokenizer, resolve_model

    folder = resolve_model(args.model)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32  # nanoengine's default there
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder)
    hf_tok.pad_token = hf_tok.pad_token or hf_tok.eos_token
    ours = Tokenizer.from_folder(folder)
    batch, texts = texts_of(ours, args.prompts, 16, 256), texts_of(ours, args.texts, 32, 512)
    generate_s, score_s, logprobs = {}, {}, None
    torch.set_num_threads(args.threads)
    for size in args.batches:
        hf_tok.padding_side = "left"
        generate_s[size] = padded_generate_s(model, hf_tok, batch, size, args.new_tokens)
        hf_tok.padding_side = "right"
        start = time.perf_counter()
        logprobs = [row for i in range(0, len(texts), size) for row in batched_logprobs(model, hf_tok, texts[i : i + size])]
        score_s[size] = time.perf_counter() - start
    return {"threads": torch.get_num_threads(), "dtype": str(dtype), "generate_s": generate_s, "score_s": score_s, "logprobs": logprobs}


def batched_logprobs(model, hf_tok, texts: list[str]) -> list[list[float]]:
    """transformers' batched forward: each text's token log-probs from one right-padded pass."""
    import torch

    encoded = hf_tok(texts, return_tensors="pt", padding=True).to(model.device)
    with torch.inference_mode():
        logits = model(**encoded).logits[:, :-1].float()  # (B, T-1, V)
        targets = encoded.input_ids[:, 1:, None]
        values = logits.gather(-1, targets)[..., 0] - logits.logsumexp(-1)  # (B, T-1)
    lengths = encoded.attention_mask.sum(-1).tolist()
    return [values[row, : n - 1].tolist() for row, n in enumerate(lengths)]  # .tolist(): synchronised


def compile_worker(args: argparse.Namespace) -> dict:
    """Seconds to compile each decode bucket of `args.buckets` in the background, from this
    process's inductor cache (cold in the first such worker, warm in the second)."""
    import nanoengine
    from nanoengine.engine.compiling import BackgroundCompile

    llm = nanoengine.load(args.model)
    compiler = BackgroundCompile(llm.model, llm.engine.max_seq_len, after_tokens=0)
    start = time.perf_counter()
    compiler.wait(args.buckets, timeout=None)
    compiler.stop()
    return {"total_s": time.perf_counter() - start, "failed": compiler.failed,
            "seconds": {f"{r}x{n}": s for (r, n), s in compiler.seconds.items()}}  # fmt: skip


def run_worker(name: str, argv: list[str], threads: int, env: dict | None = None) -> dict:
    """Run a worker in a fresh process with `threads` CPU threads. Pinned: left to itself, nanoengine
    takes the CPUs idle at load time, and the load average the previous worker leaves behind
    gave a run's int8 and int4 workers one thread of two."""
    command = [sys.executable, __file__, "--worker", name, *argv]
    env = {**os.environ, "NANOENGINE_THREADS": str(threads), **(env or {})}
    before = cpu_ticks()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"worker {name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ticks, steal = (after - then for after, then in zip(cpu_ticks(), before))
    result["steal_share"] = steal / ticks if ticks else 0.0
    return result


def targets(runs: dict, base: str = "float32") -> list[tuple[str, str, bool]]:
    """(target, what was measured, met) for every target of the issue; `base` is the dtype the
    others are compared with (float32 on CPU)."""
    fp32, hf = runs[base], runs["transformers"]
    best_gen = min(hf["generate_s"], key=hf["generate_s"].get)
    best_score = min(hf["score_s"], key=hf["score_s"].get)
    gen_ratio, score_ratio = hf["generate_s"][best_gen] / fp32["generate_s"], hf["score_s"][best_score] / fp32["score_s"]
    worst = max(abs(a - b) for ours, theirs in zip(fp32["logprobs"], hf["logprobs"]) for a, b in zip(ours, theirs))
    same_lengths = all(len(a) == len(b) for a, b in zip(fp32["logprobs"], hf["logprobs"]))
    s = fp32["streams"]
    rows = [
        ("llm.generate >= 2.0x transformers' best padded batch generate",
         f"{fp32['generate_s']:.1f} s vs {hf['generate_s'][best_gen]:.1f} s (batch {best_gen}): {gen_ratio:.2f}x", gen_ratio >= 2.0),
        ("llm.generate texts = nanoengine's solo greedy texts",
         f"{len(fp32['solo_checked'])} of {fp32['solo_checks']} checked prompts equal", len(fp32["solo_checked"]) == fp32["solo_checks"]),
        ("llm.score >= 2.0x transformers' best batched forward",
         f"{fp32['score_s']:.1f} s vs {hf['score_s'][best_score]:.1f} s (batch {best_score}): {score_ratio:.2f}x", score_ratio >= 2.0),
        ("llm.score log-probs = transformers' within 1e-3", f"largest difference {worst:.2e}", same_lengths and worst <= 1e-3),
        ("8 streams >= 5x one stream's tok/s", f"{s['8']:.1f} vs {s['1']:.1f} tok/s: {s['8'] / s['1']:.2f}x", s["8"] >= 5 * s["1"]),
        ("32 streams >= 10x one stream's tok/s", f"{s['32']:.1f} vs {s['1']:.1f} tok/s: {s['32'] / s['1']:.2f}x", s["32"] >= 10 * s["1"]),
        ("one stream no slower than the single-sequence loop",
         f"{s['1']:.1f} vs {s['solo_loop']:.1f} tok/s", s["1"] >= 0.95 * s["solo_loop"]),
    ]  # fmt: skip
    for dtype in ("int8", "int4"):
        q = runs.get(dtype)
        if q is None:
            continue
        rows.append((f"{dtype} llm.generate no slower than {base}'s", f"{q['generate_s']:.1f} s vs {fp32['generate_s']:.1f} s", q["generate_s"] <= fp32["generate_s"]))
        same = sum(a == b for a, b in zip(q["texts"], fp32["texts"]))
        rows.append((f"{dtype} greedy texts = {base}'s", f"{same} of {len(q['texts'])} equal", same == len(q["texts"])))
    return rows


def table(runs: dict, args: argparse.Namespace) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    base = args.dtypes.split(",")[0]
    lines += [f"| {name} | {measured} | {'met' if met else '**NOT met**'} |" for name, measured, met in targets(runs, base)]
    hf = runs["transformers"]
    lines.append("\ntransformers by batch size: " + "; ".join(
        f"{b}: generate {hf['generate_s'][b]:.1f} s, score {hf['score_s'][b]:.1f} s" for b in hf["generate_s"]))  # fmt: skip
    for name in ("cold", "warm"):
        c = runs.get(f"compile_{name}")
        if c is not None:
            each = ", ".join(f"{shape}: {s:.0f} s" for shape, s in c["seconds"].items())
            lines.append(f"compile, {name} inductor cache: {c['total_s']:.0f} s for {len(c['seconds'])} buckets ({each})")
    fp32 = runs[base]
    lines.append(
        f"sizes: {args.prompts} prompts of 16-256 tokens x {args.new_tokens} new ({fp32['generated_tokens']} generated); "
        f"{args.texts} texts of 32-512 tokens ({fp32['score_tokens']} tokens); streams of {args.stream_tokens} new tokens"
    )
    lines.append("threads: " + ", ".join(f"{name} {run['threads']}" for name, run in runs.items() if "threads" in run))
    lines.append("CPU time the host took (steal) while each ran: " + ", ".join(
        f"{name} {run['steal_share']:.0%}" for name, run in runs.items() if "steal_share" in run))  # fmt: skip
    return "\n".join(lines)


def chart(runs: dict, path: Path, args: argparse.Namespace) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'nanoengine[bench]'): no PNG written", file=sys.stderr)
        return False
    dtypes = args.dtypes.split(",")
    hf, fp32 = runs["transformers"], runs[dtypes[0]]
    fig, (gen, score, streams_axis) = plt.subplots(1, 3, figsize=(14, 4))
    names = [f"hf batch {b}" for b in hf["generate_s"]] + [f"nanoengine {d}" for d in dtypes]
    gen.barh(names, [*hf["generate_s"].values(), *(runs[d]["generate_s"] for d in dtypes)])
    gen.set_xlabel("llm.generate wall time, s")
    score.barh([f"hf batch {b}" for b in hf["score_s"]] + ["nanoengine"], [*hf["score_s"].values(), fp32["score_s"]])
    score.set_xlabel("llm.score wall time, s")
    levels = [k for k in fp32["streams"] if k.isdigit()]
    streams_axis.plot([int(k) for k in levels], [fp32["streams"][k] for k in levels], marker="o")
    streams_axis.set_xscale("log", base=2)
    streams_axis.set_xlabel("concurrent streams")
    streams_axis.set_ylabel("tok/s")
    for axis in (gen, score, streams_axis):
        axis.grid(alpha=0.3)
    where = f"{args.threads} threads" if args.device == "cpu" else args.device
    fig.suptitle(f"{Path(args.model).name}, {dtypes[0]} unless said, {where}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def compact(report: dict) -> dict:
    """The report with the texts and log-probs it compared left out (a 1,000-text run's are tens of MB)."""
    def short(value):
        return f"({len(value)} entries, left out)" if isinstance(value, list) else value

    runs = {name: {key: short(v) if key in ("texts", "logprobs") else v for key, v in run.items()} for name, run in report["runs"].items()}
    return {**report, "runs": runs}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--stream-tokens", type=int, default=128)
    parser.add_argument("--solo-checks", type=int, default=16, help="prompts whose text is checked against generate()")
    parser.add_argument("--buckets", default="1x256,1x512", help="decode buckets (rows x cache length) to time compiling")
    parser.add_argument("--dtypes", default="float32,int8,int4")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every system (the issue's 2)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few prompts and texts, no compile")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=MODEL, help="a registered model or a checkpoint folder")
    parser.add_argument("--random-weights", action="store_true", help="the model's architecture with random weights (see above)")
    parser.add_argument("--out", type=Path, default=None, help="the JSON (default: results/throughput-DEVICE.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, not {args.threads}")
    args.streams, args.batches = [1, 8, 32], BATCHES
    if args.quick:
        args.prompts, args.new_tokens, args.texts, args.stream_tokens, args.solo_checks = 8, 4, 8, 4, 2
        args.streams, args.batches, args.buckets = [1, 8, 32], (4, 8), ""
    if args.device == "cuda":
        args.buckets = ""  # decode steps are recorded as CUDA graphs there, nothing is compiled
    args.buckets = [tuple(int(n) for n in b.split("x")) for b in args.buckets.split(",") if b]
    args.out = args.out or RESULTS_DIR / f"throughput-{args.device}.json"
    return args


def random_weights(model: str, folder: Path) -> Path:
    """`model`'s architecture with random weights (seed 0) and its tokenizer, saved into `folder`."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from nanoengine import resolve_model

    source = resolve_model(model)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    return folder


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.worker:
        if args.worker == "transformers":
            result = transformers_worker(args)
        elif args.worker == "compile":
            result = compile_worker(args)
        else:
            result = nanoengine_worker(args.worker, args)
        print(json.dumps(result))
        return 0
    context = others_running()
    if args.random_weights:  # made once, here; every worker loads the same folder
        args.model = str(random_weights(args.model, Path(tempfile.mkdtemp())))
        argv = [a for a in argv if a != "--random-weights"] + ["--model", args.model]
    runs = {dtype: run_worker(dtype, argv, args.threads) for dtype in args.dtypes.split(",")}
    runs["transformers"] = run_worker("transformers", argv, args.threads)
    runs["transformers"]["generate_s"] = {int(k): v for k, v in runs["transformers"]["generate_s"].items()}
    runs["transformers"]["score_s"] = {int(k): v for k, v in runs["transformers"]["score_s"].items()}
    if args.buckets:
        with tempfile.TemporaryDirectory() as cache:  # a fresh inductor cache: cold, then warm
            env = {"TORCHINDUCTOR_CACHE_DIR": cache}
            runs["compile_cold"], runs["compile_warm"] = (run_worker("compile", argv, args.threads, env) for _ in range(2))
    import torch

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "weights": "random (the architecture's shapes)" if args.random_weights else "the checkpoint's",
        "torch": torch.__version__,
        "running_beside": context,
        "targets": [{"target": t, "measured": m, "met": met} for t, m, met in targets(runs, args.dtypes.split(",")[0])],
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(compact(report), indent=2))
    print(f"{report['machine']}, torch {report['torch']}; at the start: {context}\n{table(runs, args)}")
    png = args.out.with_suffix(".png")
    if chart(runs, png, args):
        print(f"\nwrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
