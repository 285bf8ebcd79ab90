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
