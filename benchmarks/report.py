"""The report of `bench.py`: the table, the issue's targets met or not, the chart and the files.

Figures per system are {"median", "min", "max", "runs"}; ratios are to the baseline's median,
inverted where lower is better, so that above 1.0x is always faster.
"""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BASELINE = "transformers-fp32"
METRICS = {  # name: (unit, higher is better)
    "prefill_ms": ("ms", False),
    "ttft_ms": ("ms", False),
    "decode_tok_s": ("tok/s", True),
}


def spread(values: list[float]) -> dict:
    """A figure as the report carries it: median, min and max of the runs, and the runs."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def cpu_ticks() -> tuple[int, int]:
    """(all, steal) CPU ticks since boot (/proc/stat; zeros elsewhere): steal is time the host gave
    this virtual machine's CPUs to others, which no process list here shows."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0, 0
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(results: dict) -> str:
    """Markdown: median (min-max) of each figure and its ratio to the baseline's median."""
    base = next((r for r in results["systems"] if r["system"] == results["baseline"]), None)
    lines = [
        "| system | prefill ms | TTFT ms | decode tok/s | peak RSS MB (model) | load s | warm-up s | greedy = baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["systems"]:
        cells = [r["system"]]
        for metric, (_, higher) in METRICS.items():
            m = r[metric]
            cell = f"{m['median']:.1f} ({m['min']:.1f}-{m['max']:.1f})"
            if base:
                b = base[metric]["median"]
                cell += f" **{(m['median'] / b if higher else b / m['median']):.2f}x**"
            cells.append(cell)
        cells += [f"{r['peak_rss_mb']:.0f} ({r['model_rss_mb']:.0f})", f"{r['load_s']:.2f}", f"{r['warmup_s']:.1f}"]
        cells.append("yes" if r["greedy_as_baseline"] else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(results: dict) -> list[str]:
    """The issue's targets, each with its figure from this run and whether it is met."""
    rows = {r["system"]: r for r in results["systems"]}
    lines = []

    def check(name: str, figure: float, goal: float, higher: bool, unit: str = "x") -> None:
        met = figure >= goal if higher else figure <= goal
        lines.append(f"- {name}: {figure:.2f}{unit} ({'>=' if higher else '<='} {goal}{unit}): {'met' if met else 'NOT met'}")

    def ratio(system: str, metric: str, other: str) -> float:
        a, b = rows[system][metric]["median"], rows[other][metric]["median"]
        return a / b if METRICS[metric][1] else b / a

    if "nanoengine-default" in rows and BASELINE in rows:
        check("default options, after the background compile: decode vs transformers fp32", ratio("nanoengine-default", "decode_tok_s", BASELINE), 2.5, True)
    for system in ("nanoengine-int4-compiled", "nanoengine-int4"):
        if system in rows and "llama.cpp-q4_1" in rows:
            check(f"{system}: decode vs llama.cpp Q4_1", ratio(system, "decode_tok_s", "llama.cpp-q4_1"), 1.1, True)
            check(f"{system}: peak RSS vs llama.cpp's", rows[system]["peak_rss_mb"] / rows["llama.cpp-q4_1"]["peak_rss_mb"], 1.5, False)
    for system, row in rows.items():
        if row["backend"] != "transformers" and BASELINE in rows:
            lines.append(f"- {system}: greedy text {'=' if row['greedy_as_baseline'] else '!='} transformers fp32's")
            if row["backend"].startswith("nanoengine") or row["backend"] == "engine":
                check(f"{system}: prefill vs transformers fp32", ratio(system, "prefill_ms", BASELINE), 1.0, True)
    if "nanoengine-fp32" in rows:
        check("load of the model (nanoengine-fp32)", rows["nanoengine-fp32"]["load_s"], 0.5, False, " s")
    if results.get("cold_start_s"):
        check("cold process to first token (nanoengine complete)", results["cold_start_s"]["median"], 2.0, False, " s")
    return lines


def chart(results: dict, path: Path) -> Path | None:
    """Bars of decode tok/s and prefill ms per system (min-max as error bars); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = results["systems"]
    names = [r["system"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.8))
    for ax, metric, title in ((axes[0], "decode_tok_s", "decode (tok/s, higher is better)"),
                              (axes[1], "prefill_ms", f"prefill of {results['prompt_tokens']} tokens (ms)")):  # fmt: skip
        med = [r[metric]["median"] for r in rows]
        err = [[m - r[metric]["min"] for m, r in zip(med, rows)], [r[metric]["max"] - m for m, r in zip(med, rows)]]
        colors = ["tab:blue" if r["backend"] in ("nanoengine", "engine") else "tab:gray" for r in rows]
        ax.barh(names, med, xerr=err, color=colors)
        ax.invert_yaxis()
        ax.set_title(title)
    axes[1].set_yticklabels([])
    busy = f", {results['busy_processes']} busy process(es) beside" if results.get("busy_processes") else ""
    fig.suptitle(f"{results['model']}, {results['cpu']}, {results['threads']} threads{busy}, torch {results['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save(results: dict, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path | None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench-" + results["date"].replace(":", "")
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=1))
    return json_path, chart(results, out_dir / f"{stem}.png")
