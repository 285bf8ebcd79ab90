"""Prefill, time to first token, decode speed and peak memory: nanoengine's modes against transformers.

    python benchmarks/bench.py                 # every system, 128-token prompt, 128 new tokens, 5 runs
    python benchmarks/bench.py --quick         # a smoke run: 1 run, 16-token prompt, 8 tokens, fp32 only
    python benchmarks/bench.py --systems nanoengine-fp32,transformers-fp32 --runs 9
    python benchmarks/bench.py --busy 1 --threads 1   # with a competing busy process (compare --threads 2)

Each system lives in its own worker subprocess (so that its peak resident memory is its own) that
loads the model once and warms up (compilation included, timed apart). The parent then asks the
workers for one measurement each, in turn, round after round, so that a noisy neighbour slows
every system alike; it reports the median, min and max of the rounds, each figure's ratio to
transformers fp32, and writes JSON and a PNG chart under `benchmarks/results/`.

`--busy N` keeps N other processes spinning on the CPU for the whole run, as on a shared machine:
run it with `--threads` equal to the CPU count, then with one thread fewer, to see what
nanoengine's default thread choice (`nanoengine/threads.py`) avoids.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py beside, when loaded from elsewhere

from report import BASELINE, METRICS, RESULTS_DIR, cpu_model, save, spread, table, targets  # noqa: E402

PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a screw press into a system that could produce "
    "books quickly and cheaply. Within fifty years presses had spread to more than two hundred cities. "
)


@dataclass(frozen=True)
class System:
    name: str
    backend: str  # nanoengine (generate), engine (the serving loop), transformers, llama.cpp
    dtype: str
    compile: bool = False


SYSTEMS = {
    s.name: s
    for s in (
        # Default options in a long-running process: the engine, measured once its background
        # compile of the one-sequence step is done (the warm-up waits for it).
        System("nanoengine-default", "engine", "float32"),
        System("nanoengine-fp32", "nanoengine", "float32"),
        System("nanoengine-fp32-compiled", "nanoengine", "float32", compile=True),
        System("nanoengine-bf16", "nanoengine", "bfloat16"),
        System("nanoengine-bf16-compiled", "nanoengine", "bfloat16", compile=True),
        System("nanoengine-fp16", "nanoengine", "float16"),
        System("nanoengine-fp16-compiled", "nanoengine", "float16", compile=True),
        System("nanoengine-int8", "nanoengine", "int8"),
        System("nanoengine-int8-compiled", "nanoengine", "int8", compile=True),
        System("nanoengine-int4", "nanoengine", "int4"),
        System("nanoengine-int4-compiled", "nanoengine", "int4", compile=True),
        System("transformers-fp32", "transformers", "float32"),
        System("transformers-bf16", "transformers", "bfloat16"),
        System("llama.cpp-q4_1", "llama.cpp", "q4_1"),
    )
}
QUICK_SYSTEMS = ("nanoengine-fp32", BASELINE)


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python imports (a build without its dependencies does not)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure means: leave it out
        return False
    return True


def default_systems() -> list[str]:
    return [n for n, s in SYSTEMS.items() if s.backend != "llama.cpp" or llama_cpp_available()]


# --- the worker: one system, one process ---------------------------------------------------------


class Runner:
    """Loads one system and times one generation at a time: `measure()` -> {metric: value}."""

    def __init__(self, system: System, folder: Path, prompt_len: int, new_tokens: int) -> None:
        import torch

        from nanoengine import Tokenizer

        self.system, self.folder, self.new_tokens = system, folder, new_tokens
        self.tokenizer = Tokenizer.from_folder(folder)  # ours for every system: texts compare alike
        ids = self.tokenizer.encode(PROMPT_TEXT * (1 + prompt_len // 40), add_special_tokens=False)
        assert len(ids) >= prompt_len, "the benchmark prompt is too short"
        self.prompt = ids[:prompt_len]
        self.torch = torch
        start = time.perf_counter()
        getattr(self, f"_load_{system.backend.replace('.', '_')}")()
        self.load_s = time.perf_counter() - start

    def _load_engine(self) -> None:
        import nanoengine

        self.llm = nanoengine.load(self.folder)
        self.model = self.llm.model
        self.prompt_text = self.tokenizer.decode(self.prompt)
        assert self.tokenizer.encode(self.prompt_text) == self.prompt, "the prompt does not round-trip"

    def warm_up(self) -> None:
        """First-call costs and compilation; for the engine, until its background compile is in use."""
        self.measure()
        if self.system.backend == "engine":
            compiler, end = self.llm.engine.compiler, time.monotonic() + 1800
            while not compiler.compiled and not compiler.failed and time.monotonic() < end:  # after 256 tokens
                self.measure()
            assert compiler.compiled, "the background compile failed or took over 30 minutes (see the log)"
            self.measure()

    def _load_nanoengine(self) -> None:
        from nanoengine import load_model

        self.model = load_model(self.folder, dtype=self.system.dtype)
        if self.system.compile:
            from nanoengine.engine.compiling import compile_steps

            compile_steps(self.model)  # generate()'s runner compiles its one-row step

    def _load_transformers(self) -> None:
        from transformers import AutoModelForCausalLM

        dtype = getattr(self.torch, self.system.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=dtype).eval()

    def _load_llama_cpp(self) -> None:
        from llama_cpp import Llama

        gguf = next(self.folder.glob("*.gguf"))
        self.model = Llama(str(gguf), n_ctx=512, n_threads=self.torch.get_num_threads(), verbose=False)

    def measure(self) -> dict[str, float]:
        """Prefill alone, then a whole generation: time to first token and decode rate."""
        backend = self.system.backend.replace(".", "_")
        prefill_s = getattr(self, f"_prefill_{'nanoengine' if backend == 'engine' else backend}")()
        stamps, text = getattr(self, f"_generate_{backend}")()
        start, first, last = stamps[0], stamps[1], stamps[-1]
        return {
            "prefill_ms": prefill_s * 1e3,
            "ttft_ms": (first - start) * 1e3,
            "decode_tok_s": (len(stamps) - 2) / (last - first),
            "tokens": len(stamps) - 1,
            "text": text,  # greedy: the same in every run
        }

    def _prefill_nanoengine(self) -> float:
        from nanoengine import KVCache

        torch, model = self.torch, self.model
        cache = KVCache(model.config, 1, len(self.prompt), model.compute_dtype, "cpu")
        ids = torch.tensor([self.prompt])  # (1, T)
        with torch.inference_mode():
            start = time.perf_counter()
            model(ids, torch.arange(len(self.prompt)), cache, last_only=True)
            return time.perf_counter() - start

    def _generate_nanoengine(self) -> tuple[list[float], str]:
        from nanoengine import generate

        stamps, ids = [time.perf_counter()], []
        for step in generate(self.model, self.prompt, self.new_tokens, eos_ids=()):
            stamps.append(time.perf_counter())
            ids.append(step.id)
        return stamps, self.tokenizer.decode(ids)

    def _generate_engine(self) -> tuple[list[float], str]:
        stamps, text = [time.perf_counter()], ""
        chunks = self.llm.complete(self.prompt_text, stream=True, max_new_tokens=self.new_tokens, temperature=0, return_token_log_probs=True)
        for chunk in chunks:  # one chunk per token (log-probs asked for)
            stamps.append(time.perf_counter())
            text += chunk.text
        return stamps, text

    def _prefill_transformers(self) -> float:
        torch = self.torch
        ids = torch.tensor([self.prompt])  # (1, T)
        with torch.inference_mode():
            start = time.perf_counter()
            self.model(ids, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - start

    def _generate_transformers(self) -> tuple[list[float], str]:
        from transformers.generation.streamers import BaseStreamer

        stamps, generated = [time.perf_counter()], []

        class Stamper(BaseStreamer):
            def put(self, value) -> None:
                if value.ndim == 1:  # the prompt comes first, as (1, T): not a token
                    stamps.append(time.perf_counter())
                    generated.append(int(value[0]))

            def end(self) -> None:
                pass

        ids = self.torch.tensor([self.prompt])
        n = self.new_tokens
        with self.torch.inference_mode():
            self.model.generate(
                ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=2, streamer=Stamper(),
            )  # fmt: skip
        return stamps, self.tokenizer.decode(generated)

    def _prefill_llama_cpp(self) -> float:
        self.model.reset()
        start = time.perf_counter()
        self.model.eval(self.prompt)
        return time.perf_counter() - start

    def _generate_llama_cpp(self) -> tuple[list[float], str]:
        self.model.reset()
        stamps, ids = [time.perf_counter()], []
        for token in self.model.generate(self.prompt, top_k=1, reset=True):
            stamps.append(time.perf_counter())
            ids.append(token)
            if len(ids) == self.new_tokens:
                break
        return stamps, self.tokenizer.decode(ids)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(args: argparse.Namespace) -> None:
    """Serve the parent over stdin/stdout, one JSON line per request ("run" or "quit")."""
    os.environ["NANOENGINE_THREADS"] = str(args.threads)  # every system the same, whatever the load
    import torch

    torch.set_num_threads(args.threads)
    if SYSTEMS[args.worker].backend == "transformers":
        import transformers  # noqa: F401  (in the baseline RSS, as nanoengine's imports are)
    base_rss = peak_rss_mb()
    runner = Runner(SYSTEMS[args.worker], Path(args.folder), args.prompt_len, args.new_tokens)
    start = time.perf_counter()
    runner.warm_up()  # excluded from the figures
    warmup_s = time.perf_counter() - start
    reply({"load_s": runner.load_s, "warmup_s": warmup_s, "base_rss_mb": base_rss})
    for line in sys.stdin:
        if line.strip() == "quit":
            reply({"peak_rss_mb": peak_rss_mb()})
            return
        reply(runner.measure())


def reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# --- the parent: alternate between workers, summarise -------------------------------------------


class Worker:
    def __init__(self, name: str, args: argparse.Namespace) -> None:
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--worker", name, "--folder", str(args.folder),
            "--threads", str(args.threads), "--prompt-len", str(args.prompt_len),
            "--new-tokens", str(args.new_tokens),
        ]  # fmt: skip
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self.ask(None)  # the worker speaks first, once warmed up
        self.runs: list[dict[str, float]] = []

    def ask(self, request: str | None) -> dict:
        if request is not None:
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker {self.name} died (exit code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.info.update(self.ask("quit"))
        self.proc.wait()


def summarise(worker: Worker, baseline_text: str | None) -> dict:
    row = {"system": worker.name, **SYSTEMS[worker.name].__dict__, **worker.info}
    texts = {run.pop("text") for run in worker.runs}
    row["text"] = texts.pop() if len(texts) == 1 else None  # greedy: one text, else a finding
    row["greedy_as_baseline"] = baseline_text is not None and row["text"] == baseline_text
    for metric in METRICS:
        values = [run[metric] for run in worker.runs]
        row[metric] = spread(values)
    row["model_rss_mb"] = row["peak_rss_mb"] - row["base_rss_mb"]
    return row


def run_benchmark(
    systems: list[str] | None = None,
    runs: int = 5,
    threads: int = 2,
    prompt_len: int = 128,
    new_tokens: int = 128,
    folder: str | Path | None = None,
    busy: int = 0,
) -> dict:
    """Run the benchmark and return its results (what the JSON file holds); `busy` other processes
    spin on the CPU meanwhile."""
    import torch

    from nanoengine import DEFAULT_MODEL, fetch_model

    folder = Path(folder) if folder else fetch_model(DEFAULT_MODEL)
    systems = systems or default_systems()
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown systems {unknown}; known: {', '.join(SYSTEMS)}")
    args = argparse.Namespace(folder=folder, threads=threads, prompt_len=prompt_len, new_tokens=new_tokens)
    workers = []
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        for name in systems:  # one at a time: loading and compiling must not overlap either
            workers.append(Worker(name, args))
        for _ in range(runs):
            for w in workers:
                w.runs.append(w.ask("run"))
        for w in workers:
            w.close()
    finally:
        for process in [w.proc for w in workers] + spinners:
            process.kill()
            process.wait()
    base = next((w for w in workers if w.name == BASELINE), None)
    baseline_text = base.runs[0]["text"] if base else None
    weights = folder / "model.safetensors"
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": str(folder.name),
        "weights_mb": weights.stat().st_size / 2**20 if weights.is_file() else None,
        "torch": torch.__version__,
        "threads": threads,
        "busy_processes": busy,
        "cpu": cpu_model(),
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "runs": runs,
        "baseline": BASELINE,
        "systems": [summarise(w, baseline_text) for w in workers],
        "cold_start_s": cold_start(folder, runs, threads) if "nanoengine-fp32" in systems else None,
    }


def cold_start(folder: Path, runs: int, threads: int) -> dict:
    """Seconds from starting a `nanoengine complete` process to its first token on stdout (the
    operating system's file cache warm, as on any second run): median, min, max of `runs`."""
    cmd = [sys.executable, "-m", "nanoengine", "complete", "--model", str(folder), "--max-new-tokens", "1", "The capital of France is"]
    env = {**os.environ, "NANOENGINE_THREADS": str(threads)}
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        if not process.stdout.read(1):
            raise RuntimeError(f"{' '.join(cmd)} printed nothing (exit code {process.wait()})")
        seconds.append(time.perf_counter() - start)
        process.wait()
    return spread(seconds)


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--systems", help=f"comma-separated, from: {', '.join(SYSTEMS)} (default: all available)")
    p.add_argument("--runs", type=int, default=5, help="measured runs per system, after a warm-up (default: 5)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every system (default: 2)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt length in tokens (default: 128)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per run (default: 128)")
    p.add_argument("--busy", type=int, default=0, help="other processes kept spinning on the CPU meanwhile (default: 0)")
    p.add_argument("--folder", help="checkpoint folder (default: the default model, fetched if missing)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the JSON and PNG go")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 run, 16-token prompt, 8 tokens, fp32 only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.prompt_len, args.new_tokens = 1, 16, 8
        args.systems = args.systems or ",".join(QUICK_SYSTEMS)
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    if args.worker:
        worker(args)
        return 0
    results = run_benchmark(
        args.systems.split(",") if args.systems else None,
        args.runs, args.threads, args.prompt_len, args.new_tokens, args.folder, args.busy,
    )  # fmt: skip
    json_path, png_path = save(results, args.out)
    busy = f", {results['busy_processes']} busy process(es) beside" if results["busy_processes"] else ""
    print(f"{results['model']} on {results['cpu']}, {results['threads']} threads{busy}, torch {results['torch']}; "
          f"{results['prompt_tokens']}-token prompt, {results['new_tokens']} new tokens, "
          f"median (min-max) of {results['runs']} runs, ratio to {results['baseline']} in bold")  # fmt: skip
    print(table(results))
    print("\n".join(["", "Targets:", *targets(results)]))
    print(f"results: {json_path}" + (f", chart: {png_path}" if png_path else ""))
    if png_path is None:
        print("chart: skipped, matplotlib is not installed (pip install 'nanoengine[bench]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
