"""Concurrent streams through the engine on a GPU, twice in one process: first while the engine
records each bucket's CUDA graph (a fresh server), then with every graph recorded (a warm one).

    python benchmarks/cuda_streams.py        # on a machine with a CUDA GPU, from the repository root

SmolLM2's architecture with random weights (`throughput_bench.random_weights`: the weights could
not be sent to the lent GPU), bfloat16, 1, 8 and 32 streams of 128 new tokens over prompts of
64-512 tokens through `Completion.acreate` (`engine_bench.concurrency_level`), 32 rows.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import concurrency_level, prompts  # noqa: E402
from throughput_bench import random_weights  # noqa: E402


def main() -> int:
    import nanoengine

    folder = str(random_weights("weights/smollm2-135m-instruct", Path(tempfile.mkdtemp())))
    nanoengine.configure(dtype="bfloat16", device="cuda", max_batch_size=32, background_compile=False)
    llm = nanoengine.load(folder)
    for round in ("first (recording)", "second (replaying)"):
        for n in (1, 8, 32):
            r = concurrency_level(prompts(llm.tokenizer, n, 64, 512), 128, folder)
            graphs = len(llm.engine.runner.graphs.graphs)
            print(f"{round}: {n} streams {r['tok_s']:.0f} tok/s, itl p50 {r['itl_p50_ms']:.1f} ms, graphs {graphs}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
