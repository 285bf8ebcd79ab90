"""The README's Completion examples (sync, sync stream, async, async stream) run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Completions from Python"
EXPECTED = "Paris"  # each example completes "The capital of France is" greedily


def python_blocks(markdown: str, section: str) -> list[str]:
    """The ```python blocks between `section` and the next heading of the same level."""
    start = markdown.find(section)
    if start < 0:
        return []
    rest = markdown[start + len(section) :]
    end = re.search(r"^## ", rest, flags=re.MULTILINE)
    return re.findall(r"^```python\n(.*?)^```", rest[: end.start() if end else None], re.MULTILINE | re.DOTALL)


def test_the_readme_shows_the_four_usage_forms():
    blocks = python_blocks(README.read_text(encoding="utf-8"), SECTION)
    assert len(blocks) == 4, f"README.md should have the four examples under {SECTION!r}"
    assert "stream=True" not in blocks[0] and "stream=True" in blocks[1]
    assert all("acreate" in block for block in blocks[2:]) and "stream=True" in blocks[3]


@pytest.mark.parametrize("index", range(4), ids=["sync", "sync-stream", "async", "async-stream"])
def test_a_readme_example_runs(index, capsys, smollm2_folder):
    blocks = python_blocks(README.read_text(encoding="utf-8"), SECTION)
    if index >= len(blocks):
        pytest.fail(f"README.md lacks example {index + 1} under {SECTION!r}")
    exec(compile(blocks[index], f"README.md example {index + 1}", "exec"), {"__name__": "__main__"})
    assert EXPECTED in capsys.readouterr().out


def test_the_engine_sections_batch_example_runs(capsys, smollm2_folder):
    blocks = python_blocks(README.read_text(encoding="utf-8"), "## The engine: many requests, one batch")
    assert len(blocks) == 1, "README.md should show llm.generate under its engine section"
    exec(compile(blocks[0], "README.md engine example", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert EXPECTED in out and "def fibonacci" not in out  # two completions, the prompts not echoed
