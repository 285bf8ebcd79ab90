"""`nanoengine inspect PROMPT`: the logit lens as a table, where heads attend, and the plots as PNGs."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import InvalidParameterError
from ..weights.registry import DEFAULT_MODEL

logger = logging.getLogger("nanoengine")


def add_inspect(commands: argparse._SubParsersAction) -> None:
    from .options import add_model_options

    inspect = commands.add_parser(
        "inspect",
        help="look inside one forward pass: the logit lens per layer, attention per head, plots",
        description="Run PROMPT through the model once and print the logit lens: for every layer and "
        "position, the token the model would predict if it stopped after that layer, with its "
        "probability. Then, for one layer, where each head attends from the last token. "
        "--png writes the pictures (needs matplotlib: pip install 'nanoengine[plot]').",
    )
    inspect.add_argument("prompt", nargs="?", help="the prompt (read from stdin when left out)")
    option = inspect.add_argument
    option("--model", default=DEFAULT_MODEL, help=f"registered name or checkpoint folder (default: {DEFAULT_MODEL})")
    option("--layer", type=int, help="the layer whose attention is shown and drawn (default: the last)")
    option("--head", type=int, help="one head of --layer to show and draw (default: every head)")
    option("--positions", type=int, default=8, metavar="N", help="show the last N positions (default: 8; 0: all)")
    option("--png", type=Path, metavar="OUT.png", help="write the logit lens to OUT.png and the attention beside it")
    add_model_options(inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from .options import configure_model_options
    from ..research.interventions import Layout
    from ..api.llm import load

    if args.positions < 0:
        raise InvalidParameterError(f"--positions must be >= 0, not {args.positions}")
    if args.png is not None:
        from ..research.plots import figure_class

        figure_class()  # matplotlib missing: say so before any work
    configure_model_options(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    llm = load(args.model)
    layout = Layout.of(llm.model)
    layer = layout.check_layer(args.layer if args.layer is not None else -1)
    heads = [layout.check_head(args.head)] if args.head is not None else list(range(layout.num_heads))
    trace = llm.trace(prompt)
    print(trace.logit_lens(k=1).table(last=args.positions or None))
    print()
    print(attention_summary(trace, layer, heads))
    if args.png is not None:
        for path in write_plots(trace, layer, args.head, args.png):
            logger.info("wrote %s", path)
    return 0


def attention_summary(trace, layer: int, heads: list[int], top: int = 3) -> str:
    """Per head, the tokens that the last token attends to most."""
    lines = [f"layer {layer}: where the last token {trace.tokens[-1]!r} attends"]
    for head in heads:
        weights = trace.attention(layer, head)[-1]  # (T,)
        values, positions = weights.topk(min(top, len(weights)))
        cells = ", ".join(f"{trace.tokens[p]!r} {v:.2f}" for v, p in zip(values.tolist(), positions.tolist()))
        lines.append(f"  head {head}: {cells}")
    return "\n".join(lines)


def write_plots(trace, layer: int, head: int | None, png: Path) -> list[Path]:
    from ..research.plots import plot_attention, plot_attention_heads, plot_logit_lens

    stem = png.with_suffix("")
    paths = [png, Path(f"{stem}-layer{layer}-heads.png")]
    plot_logit_lens(trace, paths[0])
    plot_attention_heads(trace, layer, paths[1])
    if head is not None:
        paths.append(Path(f"{stem}-layer{layer}-head{head}.png"))
        plot_attention(trace, layer, head, paths[2])
    return paths

