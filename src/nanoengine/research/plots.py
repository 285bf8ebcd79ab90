"""Pictures of a trace: attention heatmaps and the logit-lens grid (the optional `plot` extra).

Each function returns a matplotlib `Figure` (shown inline in a notebook) and, given `path`,
saves it as a PNG there. matplotlib is imported only when a plot is drawn, and only its
object-oriented API is used, so no global pyplot state or display is touched.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import NanoEngineError
from .tracing import LogitLens, Trace


class PlotDependencyError(NanoEngineError, ImportError):
    """matplotlib, which the plots need, is not installed."""


def figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotDependencyError(
            "plots need matplotlib: pip install 'nanoengine[plot]' (or pip install matplotlib)"
        ) from None
    return Figure


def _label(token: str) -> str:
    """A token as a readable tick label: spaces and newlines made visible."""
    return repr(token)[1:-1].replace(" ", "·")


def _save(figure: Any, path: str | os.PathLike | None) -> Any:
    if path is not None:
        figure.savefig(path, format="png", dpi=100, bbox_inches="tight")
    return figure


def _heatmap(ax: Any, matrix: Any, tokens: list[str], title: str, labels: bool = True) -> Any:
    future = np.triu(np.ones_like(matrix, dtype=bool), k=1)  # keys after the query: never attended, left blank
    image = ax.imshow(np.ma.masked_array(matrix, future), cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_title(title, fontsize=9)
    ticks = range(len(tokens))
    ax.set_xticks(ticks, [_label(t) for t in tokens] if labels else [], rotation=90, fontsize=7)
    ax.set_yticks(ticks, [_label(t) for t in tokens] if labels else [], fontsize=7)
    return image


def plot_attention(trace: Trace, layer: int, head: int, path: str | os.PathLike | None = None) -> Any:
    """One head's attention: a row per query token, a column per key token it may attend to."""
    weights = trace.attention(layer, head).numpy()  # checks layer and head
    Figure = figure_class()
    size = min(4 + 0.3 * len(trace.tokens), 14)
    figure = Figure(figsize=(size + 1, size), layout="constrained")
    ax = figure.add_subplot()
    title = f"layer {layer % trace.layout.num_layers}, head {head % trace.layout.num_heads}"
    image = _heatmap(ax, weights, trace.tokens, title)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    figure.colorbar(image, ax=ax, label="attention probability")
    return _save(figure, path)


def plot_attention_heads(trace: Trace, layer: int, path: str | os.PathLike | None = None) -> Any:
    """Every head of one layer, side by side in a grid."""
    layer = trace.layout.check_layer(layer)
    heads = trace.layout.num_heads
    columns = min(heads, 4)
    rows = -(-heads // columns)
    Figure = figure_class()
    cell = min(2.0 + 0.25 * len(trace.tokens), 6)
    figure = Figure(figsize=(columns * cell + 1, rows * cell), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for head, ax in enumerate(axes.flat):
        if head >= heads:
            ax.axis("off")
            continue
        weights = trace.attention(layer, head).numpy()
        image = _heatmap(ax, weights, trace.tokens, f"head {head}", labels=len(trace.tokens) <= 24)
    figure.suptitle(f"Attention of layer {layer}, every head (rows: queries, columns: keys)")
    figure.colorbar(image, ax=axes, label="attention probability", shrink=0.6)
    return _save(figure, path)


def plot_logit_lens(lens: LogitLens | Trace, path: str | os.PathLike | None = None) -> Any:
    """The logit lens as a grid: a row per layer, a column per position, each cell the top next
    token at that layer, coloured by its probability."""
    if isinstance(lens, Trace):
        lens = lens.logit_lens(k=1)
    probs = lens.probs[:, :, 0].numpy()  # (layers, T)
    layers, positions = probs.shape
    Figure = figure_class()
    figure = Figure(figsize=(2 + 1.1 * positions, 1 + 0.32 * layers), layout="constrained")
    ax = figure.add_subplot()
    image = ax.imshow(probs, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    for layer in range(layers):
        for position in range(positions):
            color = "white" if probs[layer, position] > 0.6 else "black"
            text = _label(lens.tokens[layer][position][0])[:12]
            ax.text(position, layer, text, ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(positions), [_label(t) for t in lens.input_tokens], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(layers), [str(layer) for layer in range(layers)], fontsize=7)
    ax.set_xlabel("input token (the prediction is for the token after it)")
    ax.set_ylabel("layer")
    ax.set_title("Logit lens: the top next token at each layer")
    figure.colorbar(image, ax=ax, label="probability of the top token")
    return _save(figure, path)
