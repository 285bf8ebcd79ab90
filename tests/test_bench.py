"""The benchmark in its quickest form: it runs end to end and its results have the expected shape.

Speed itself is never asserted: the machine that runs the tests is shared and noisy.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_writes_a_table_json_and_chart(smollm2_folder, tmp_path, capsys):
    bench = load_bench()
    assert bench.main(["--quick", "--folder", str(smollm2_folder), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| nanoengine-fp32 |" in out and "| transformers-fp32 |" in out

    [json_path] = tmp_path.glob("bench-*.json")
    results = json.loads(json_path.read_text())
    assert {"torch", "threads", "cpu", "prompt_tokens", "new_tokens", "systems"} <= results.keys()
    assert [r["system"] for r in results["systems"]] == ["nanoengine-fp32", "transformers-fp32"]
    for row in results["systems"]:
        assert row["dtype"] == "float32" and row["peak_rss_mb"] > 0
        for metric in ("prefill_ms", "ttft_ms", "decode_tok_s"):
            figures = row[metric]
            assert 0 < figures["min"] <= figures["median"] <= figures["max"]
            assert len(figures["runs"]) == 1
    if importlib.util.find_spec("matplotlib"):  # the chart is optional, like its library
        assert json_path.with_suffix(".png").is_file()
    else:
        assert "chart: skipped, matplotlib is not installed" in out


THROUGHPUT = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput_bench.py"


def load_throughput_bench():
    sys.path.insert(0, str(THROUGHPUT.parent))  # it reuses engine_bench's prompts and streams
    spec = importlib.util.spec_from_file_location("throughput_bench", THROUGHPUT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_throughput_targets_say_met_or_not_met_from_the_measurements():
    bench = load_throughput_bench()
    fp32 = {"generate_s": 10.0, "score_s": 5.0, "solo_checked": [0, 4], "solo_checks": 2, "texts": ["a", "b"],
            "logprobs": [[-1.0, -2.0]], "streams": {"solo_loop": 10.0, "1": 10.0, "8": 60.0, "32": 90.0},
            "generated_tokens": 8, "score_tokens": 3}  # fmt: skip
    runs = {
        "float32": fp32,
        "int8": {"generate_s": 9.0, "texts": ["a", "b"], "steal_share": 0.125},
        "int4": {"generate_s": 12.0, "texts": ["a", "c"]},
        "transformers": {"generate_s": {16: 30.0, 32: 25.0}, "score_s": {16: 8.0, 32: 9.0}, "logprobs": [[-1.0, -2.0005]]},
    }
    met = {name: ok for name, _, ok in bench.targets(runs)}
    assert met["llm.generate >= 2.0x transformers' best padded batch generate"]  # 25 / 10 = 2.5x
    assert not met["llm.score >= 2.0x transformers' best batched forward"]  # 8 / 5 = 1.6x
    assert met["llm.score log-probs = transformers' within 1e-3"]
    assert met["8 streams >= 5x one stream's tok/s"] and not met["32 streams >= 10x one stream's tok/s"]
    assert met["int8 llm.generate no slower than float32's"] and met["int8 greedy texts = float32's"]
    assert not met["int4 llm.generate no slower than float32's"] and not met["int4 greedy texts = float32's"]
    shown = bench.table(runs, bench.parse(["--quick"]))
    assert "| llm.score >= 2.0x transformers' best batched forward | 5.0 s vs 8.0 s (batch 16): 1.60x | **NOT met** |" in shown
    assert "CPU time the host took (steal) while each ran: int8 12%" in shown
