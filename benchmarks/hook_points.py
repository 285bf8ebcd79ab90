"""What the trace hook points cost when nobody traces: the forward pass with them, unused, against
the same pass with them taken out of the model (each attention's `heads` point replaced by a plain
function, its `probs` point by None, which is SDPA's path anyway).

    python benchmarks/hook_points.py [--rounds 15] [--threads N]

Prints the median (min-max) milliseconds of a 128-token prefill and of a one-token decode step
from a 256-position KV cache, both ways, measured alternately round after round; then, for
scale, a traced prefill (every activation recorded, attention computed explicitly).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from nanoengine import KVCache, Tokenizer, fetch_model, load_model
from nanoengine.model.decoder import HookPoint
from nanoengine.research.tracing import trace


@contextmanager
def hook_points_removed(model: torch.nn.Module) -> Iterator[None]:
    attentions = [m for m in model.modules() if isinstance(getattr(m, "heads", None), HookPoint)]
    kept = [(m, m.heads, m.probs) for m in attentions]
    for m in attentions:
        del m.heads, m.probs  # unregister the submodules, then set plain attributes
        m.heads, m.probs = (lambda y: y), None
    try:
        yield
    finally:
        for m, heads, probs in kept:
            del m.heads, m.probs
            m.heads, m.probs = heads, probs


def milliseconds(fn: Callable[[], object], repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) * 1000 / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = fetch_model("smollm2-135m-instruct")
    model, tokenizer = load_model(folder), Tokenizer.from_folder(folder)
    ids = torch.randint(0, 49152, (1, 128), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.config, 1, 256, torch.float32, "cpu")
    with torch.inference_mode():
        model(ids, cache=cache)  # fill the first 128 positions
        step = torch.tensor([[42]]), torch.tensor([[128]])
        cases = {
            "prefill 128 tokens": lambda: model(ids),
            "decode step (cache 256)": lambda: model(step[0], step[1], cache=cache),
        }
        times: dict[tuple[str, str], list[float]] = {}
        for case in cases.values():  # warm-up
            case()
        for round_ in range(args.rounds):
            for name, case in cases.items():
                repeat = 1 if name.startswith("prefill") else 10
                ways = ["with hook points", "removed"] if round_ % 2 == 0 else ["removed", "with hook points"]
                for way in ways:
                    if way == "removed":
                        with hook_points_removed(model):
                            ms = milliseconds(case, repeat)
                    else:
                        ms = milliseconds(case, repeat)
                    times.setdefault((name, way), []).append(ms)
    point, plain, x = HookPoint(), (lambda y: y), torch.zeros(1, 9, 1, 64)
    calls = 100_000
    per_call = {way: [milliseconds(lambda: [f(x) for _ in range(calls)], 1) * 1000 / calls for _ in range(5)]
                for way, f in (("hook point", point), ("plain function", plain))}  # fmt: skip
    points_per_pass = 2 * model.config.num_hidden_layers
    llm = SimpleNamespace(model=model, tokenizer=tokenizer)
    traced = [milliseconds(lambda: trace(llm, ids[0].tolist()), 1) for _ in range(5)]
    print(f"smollm2-135m-instruct, float32, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"median (min-max) ms of {args.rounds} alternating rounds")
    for name in cases:
        with_points, removed = times[(name, "with hook points")], times[(name, "removed")]
        ratio = statistics.median(with_points) / statistics.median(removed)
        print(f"{name:24} with hook points {summary(with_points)}   removed {summary(removed)}   ratio {ratio:.3f}")
    hook_point, plain_function = (statistics.median(per_call[way]) for way in ("hook point", "plain function"))
    extra = (hook_point - plain_function) * points_per_pass
    decode = statistics.median(times[("decode step (cache 256)", "removed")]) * 1000
    print(f"one unused hook point call: {hook_point:.2f} us, a plain function {plain_function:.2f} us; "
          f"{points_per_pass} per forward pass: "
          f"{extra:.0f} us, {100 * extra / decode:.2f}% of a decode step")
    print(f"{'traced prefill 128':24} {summary(traced)} (5 runs; records everything, explicit attention)")


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} ({min(values):.2f}-{max(values):.2f})"


if __name__ == "__main__":
    main()
