"""What the batch file machinery costs: `llm.run_batch` against `llm.generate`, and on Ray.

    python benchmarks/batch_bench.py                       # 2,000 prompts, 16 new tokens, 3 rounds
    python benchmarks/batch_bench.py --prompts 200 --runs 1 --ray
    python benchmarks/batch_bench.py --runs 0 --ray        # the Ray comparison alone

1. Throughput: the same prompts through `llm.generate` (all submitted at once, outputs in
   order) and through `llm.run_batch` (a JSONL input, a window of requests, one durable output
   line per answer), alternated round after round in one process, so a noisy neighbour slows
   both alike. Generated tokens per second of each, their ratio, and the share of CPU time the
   host took from this machine (steal) during each round. Before the first round the engine's
   one-row compiled steps are built and waited for: left to itself the engine compiles them in
   the background once it has served a while, and that compile (20 s or more, on one of the two
   cores) would land in whichever round came next.
2. The file machinery alone: writing 2,000 output lines with an `fsync` per line against one per
   second (the default), and reading them back on a resume.
3. `--ray`: a local Ray cluster with 2 CPUs; the same batch through `run_batch_on_ray` with 2
   single-thread actors, against one process with 2 threads (`llm.run_batch`), alternated round
   after round, both without the background compile. Wall time from the call to the last line
   (Ray's includes starting the actors and loading the model in each; the one process's, not its
   start and load).

Results go to stdout as a table and to benchmarks/results/batch-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import RESULTS_DIR, cpu_model, cpu_ticks, spread  # noqa: E402

TOPICS = ["the sea", "a city at night", "bread", "the moon", "trains", "a library", "winter", "bees"]


def prompts(count: int) -> list[str]:
    return [f"Write one sentence about {TOPICS[i % len(TOPICS)]} (number {i}):" for i in range(count)]


def write_input(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"custom_id": f"r{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
    return path


def compile_one_row_steps(llm, longest: int, timeout: float = 900.0) -> dict[str, float]:
    """Have the engine build its one-row decode steps for every cache length up to `longest`
    positions now, and wait for them (seconds per shape), so no round pays for a compile."""
    compiler = llm.engine.compiler
    if compiler is None:
        return {}
    shapes = [(1, length) for length in range(256, longest + 256, 256)]
    if not compiler.wait(shapes, timeout) and not compiler.failed:
        raise SystemExit(f"the one-row compiles did not end within {timeout:.0f} s")
    return {f"{r}x{n}": compiler.seconds.get((r, n), float("nan")) for r, n in shapes}


def timed(run) -> tuple[float, float]:
    """(tokens per second, steal share) of `run()`, which returns the tokens it generated."""
    before, start = cpu_ticks(), time.perf_counter()
    tokens = run()
    seconds = time.perf_counter() - start
    ticks, steal = (after - then for after, then in zip(cpu_ticks(), before))
    return tokens / seconds, steal / ticks if ticks else 0.0


def throughput(llm, texts: list[str], workdir: Path, runs: int, max_new_tokens: int) -> dict:
    """tok/s of generate and run_batch, alternated, with the host's steal during each round."""
    source = write_input(workdir / "in.jsonl", texts)
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 0}
    llm.generate(texts[:32], **sampling)  # warm-up
    longest = max(len(llm.tokenizer.encode(t)) for t in texts) + max_new_tokens
    compiles = compile_one_row_steps(llm, longest)
    rates: dict[str, list[float]] = {"generate": [], "run_batch": []}
    steal: dict[str, list[float]] = {"generate": [], "run_batch": []}
    paths = {
        "generate": lambda run: sum(o.num_completion_tokens for o in llm.generate(texts, progress=False, **sampling)),
        "run_batch": lambda run: llm.run_batch(source, workdir / f"out-{run}.jsonl", progress=False, **sampling).completion_tokens,
    }  # fmt: skip
    for run in range(runs):
        for name, path in paths.items():
            rate, stolen = timed(lambda: path(run))
            rates[name].append(rate)
            steal[name].append(stolen)
        print(f"round {run + 1}: " + ", ".join(f"{n} {rates[n][-1]:.1f} tok/s (steal {steal[n][-1]:.1%})" for n in paths), flush=True)
    return {"compiled before the rounds, s": compiles, "steal share per round": steal,
            **{name: spread(values) for name, values in rates.items()}}  # fmt: skip


def file_costs(workdir: Path, lines: int = 2000) -> dict:
    """Microseconds per output line written, with fsync per line and once a second; ms to resume."""
    from nanoengine.batch.files import ResultsFile, read_input, result_record

    body = {"request_id": "x" * 32, "output": {"text": "A sentence of about twenty tokens, as a batch answer would hold.", "num_prompt_tokens": 12, "num_completion_tokens": 16, "tokens": None}}  # fmt: skip
    costs = {}
    for name, sync_seconds in [("fsync every line", 0.0), ("fsync once a second", 1.0)]:
        path = workdir / f"lines-{sync_seconds}.jsonl"
        path.unlink(missing_ok=True)
        with ResultsFile(path, sync_seconds) as results:
            start = time.perf_counter()
            for i in range(lines):
                results.write(result_record(f"r{i}", 200, body))
            costs[f"{name}, us/line"] = (time.perf_counter() - start) / lines * 1e6
    source = write_input(workdir / "resume-in.jsonl", prompts(lines))
    start = time.perf_counter()
    read_input(source)
    with ResultsFile(workdir / "lines-1.0.jsonl"):
        pass
    costs[f"resume: read {lines} input and output lines, ms"] = (time.perf_counter() - start) * 1e3
    return costs


def ray_comparison(model: str, texts: list[str], workdir: Path, max_new_tokens: int, rounds: int) -> dict:
    """2 single-thread Ray actors against one 2-thread process, on the same batch, alternated.

    Both sides run without the background compile: in a process of its own each side would
    start compiling the one-row step after 256 tokens, on a core the batch needs, for a tail
    that is a few steps long; its cost is not Ray's overhead."""
    import ray

    from nanoengine.ray import run_batch_on_ray

    source = write_input(workdir / "ray-in.jsonl", texts)
    before = os.environ.get("NANOENGINE_BACKGROUND_COMPILE")
    os.environ["NANOENGINE_BACKGROUND_COMPILE"] = "0"  # read by the subprocess and by Ray's workers
    start = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    init = time.perf_counter() - start
    walls: dict[str, list[float]] = {"one process, 2 threads": [], "Ray, 2 actors x 1 thread": []}
    tokens = 0
    try:
        for run in range(rounds):
            single = subprocess.run(
                [sys.executable, __file__, "--one-process", model, str(source), str(workdir / f"one-{run}.jsonl"), str(max_new_tokens)],
                env={**os.environ, "NANOENGINE_THREADS": "2"}, capture_output=True, text=True, check=True,
            )  # fmt: skip
            walls["one process, 2 threads"].append(json.loads(single.stdout.strip().splitlines()[-1])["wall s"])
            start = time.perf_counter()
            summary = run_batch_on_ray(model, source, workdir / f"ray-{run}.jsonl", actors=2, threads=1, progress=False,
                                       max_new_tokens=max_new_tokens, temperature=0)  # fmt: skip
            walls["Ray, 2 actors x 1 thread"].append(time.perf_counter() - start)
            tokens = summary.completion_tokens
            print(f"Ray round {run + 1}: " + ", ".join(f"{n} {w[-1]:.1f} s" for n, w in walls.items()), flush=True)
    finally:
        ray.shutdown()
        if before is None:
            del os.environ["NANOENGINE_BACKGROUND_COMPILE"]
        else:
            os.environ["NANOENGINE_BACKGROUND_COMPILE"] = before
    result = {name: {"wall s": spread(w), "tok/s median": tokens / spread(w)["median"]} for name, w in walls.items()}
    return {**result, "ray.init s": init, "completion tokens": tokens}


def one_process(model: str, source: str, out: str, max_new_tokens: int) -> None:
    """The single-process side of the Ray comparison, in a process of its own (its own threads)."""
    import nanoengine

    start = time.perf_counter()
    llm = nanoengine.load(model)
    load = time.perf_counter() - start
    start = time.perf_counter()
    summary = llm.run_batch(source, out, progress=False, max_new_tokens=max_new_tokens, temperature=0)
    wall = time.perf_counter() - start
    print(json.dumps({"wall s": wall, "tok/s": summary.completion_tokens / wall, "load s": load}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batch_bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3, help="alternated throughput rounds (0: none, e.g. with --ray)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the throughput rounds")
    parser.add_argument("--ray", action="store_true", help="also compare 2 Ray actors with one 2-thread process")
    parser.add_argument("--ray-prompts", type=int, default=400, help="prompts of the Ray comparison")
    parser.add_argument("--ray-runs", type=int, default=3, help="alternated rounds of the Ray comparison")
    parser.add_argument("--one-process", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs < 0:
        parser.error(f"--runs must be at least 0, not {args.runs}")
    if args.ray_runs < 1:
        parser.error(f"--ray-runs must be at least 1, not {args.ray_runs}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, not {args.threads}")
    if args.one_process:
        model, source, out, tokens = args.one_process
        one_process(model, source, out, int(tokens))
        return 0
    os.environ["NANOENGINE_THREADS"] = str(args.threads)  # not the idle CPUs of the moment: see threads.py
    import nanoengine

    results = {"threads": args.threads, "date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(), "cpus": os.cpu_count(),
               "model": args.model, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        results["file machinery"] = file_costs(workdir)
        print(json.dumps(results["file machinery"], indent=1), flush=True)
        if args.runs:
            llm = nanoengine.load(args.model)
            results["throughput"] = rates = throughput(llm, prompts(args.prompts), workdir, args.runs, args.max_new_tokens)
            ratio = rates["run_batch"]["median"] / rates["generate"]["median"]
            results["run_batch / generate"] = ratio
            print(f"| path | tok/s median (min-max) |\n|---|---|")
            for name in ("generate", "run_batch"):
                r = rates[name]
                print(f"| {name} | {r['median']:.1f} ({r['min']:.1f}-{r['max']:.1f}) |")
            print(f"run_batch / generate: {ratio:.3f}")
        if args.ray:
            results["ray"] = ray_comparison(args.model, prompts(args.ray_prompts), workdir, args.max_new_tokens, args.ray_runs)
            print(json.dumps(results["ray"], indent=1))
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"batch-{datetime.date.today()}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
