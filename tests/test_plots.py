"""Plots of a trace and `nanoengine inspect`: valid PNGs of a sensible size, clear errors for a
bad layer or head, and a clear error when matplotlib is missing."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from nanoengine import InvalidParameterError
from nanoengine.cli.main import main
from nanoengine.research.plots import PlotDependencyError, plot_attention, plot_attention_heads, plot_logit_lens
from nanoengine.research.tracing import trace

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header, after checking that it is one and that it decodes."""
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    pixels = imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.05  # not a blank image
    return width, height


@pytest.fixture(scope="module")
def france(smollm2):
    return trace(smollm2, "The capital of France is")


def test_attention_heatmap(france, tmp_path):
    path = tmp_path / "attention.png"
    figure = plot_attention(france, 23, 4, path)
    width, height = png_size(path)
    assert 300 <= width <= 2000 and 300 <= height <= 2000
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["The", "·capital", "·of", "·France", "·is"]
    assert ax.get_title() == "layer 23, head 4"


def test_every_head_of_a_layer_as_a_grid(france, tmp_path):
    path = tmp_path / "heads.png"
    figure = plot_attention_heads(france, 23, path)
    width, height = png_size(path)
    assert 600 <= width <= 3000 and 400 <= height <= 3000
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles == [f"head {h}" for h in range(france.layout.num_heads)]


def test_logit_lens_grid(france, tmp_path):
    path = tmp_path / "lens.png"
    figure = plot_logit_lens(france.logit_lens(k=1), path)
    width, height = png_size(path)
    assert 400 <= width <= 3000 and 400 <= height <= 3000
    cells = [t.get_text() for t in figure.axes[0].texts]
    assert len(cells) == france.layout.num_layers * len(france.tokens)
    assert cells[-1] == "·Paris"  # the last layer's prediction after " is"


def test_a_figure_without_a_path_writes_nothing(france, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    figure = plot_logit_lens(france)
    assert figure.axes and list(tmp_path.iterdir()) == []


def test_a_bad_layer_or_head_is_named(france, tmp_path):
    with pytest.raises(InvalidParameterError, match="layer 30 is out of range: the model has 30 layers"):
        plot_attention_heads(france, 30, tmp_path / "x.png")
    with pytest.raises(InvalidParameterError, match="head 9 is out of range: each layer has 9 heads"):
        plot_attention(france, 0, 9, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_is_a_clear_error(france, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(PlotDependencyError, match=r"pip install 'nanoengine\[plot\]'"):
        plot_logit_lens(france)


def test_inspect_prints_the_logit_lens_and_writes_the_plots(smollm2_folder, tmp_path, capsys):
    png = tmp_path / "out.png"
    code = main(["inspect", "The capital of France is", "--layer", "23", "--head", "4", "--png", str(png)])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["layer", "'The'", "'", "capital'", "'", "of'", "'", "France'", "'", "is'"]
    assert lines[30].startswith("29") and "' Paris'" in lines[30]
    assert "layer 23: where the last token ' is' attends" in out and "head 4: ' France'" in out
    for path in (png, tmp_path / "out-layer23-heads.png", tmp_path / "out-layer23-head4.png"):
        png_size(path)


def test_inspect_refuses_a_bad_head(smollm2_folder, capsys):
    assert main(["inspect", "The capital of France is", "--head", "12"]) == 2
    assert "head 12 is out of range" in capsys.readouterr().err


def test_inspect_without_matplotlib_says_so_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["inspect", "The capital of France is", "--png", str(tmp_path / "out.png")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "pip install 'nanoengine[plot]'" in captured.err
