"""The worked examples (docs/ and README's "Look inside") run as written and print exactly what they show.

Each ```python block of a page runs in one namespace, in order, in a scratch folder; the ```text
block right after it must be exactly what it printed. So every number on the page comes from
running the code. After a change, `python tests/test_docs.py` reruns the pages and rewrites their
output blocks (and the pictures that a page shows, in a folder named after it).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = ["docs/look-inside.md", "README.md#Look inside"]  # a page, or one "## " section of one


def read_page(page: str) -> tuple[str, str, int, int]:
    """(the whole file, the page's text, where it starts and ends in the file)."""
    path, _, section = page.partition("#")
    text = (ROOT / path).read_text(encoding="utf-8")
    if not section:
        return text, text, 0, len(text)
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    end = len(text) if end < 0 else end + 1
    return text, text[start:end], start, end
BLOCK = re.compile(r"^```(python|text)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def run_page(markdown: str, workdir: Path) -> list[tuple[re.Match, str]]:
    """Run the page's python blocks; return each text block with what the code before it printed."""
    namespace: dict = {"__name__": "__main__"}
    results, printed = [], None
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        for number, block in enumerate(BLOCK.finditer(markdown)):
            kind, body = block.groups()
            if kind == "text":
                assert printed is not None, f"text block {number} does not follow a python block"
                results.append((block, printed))
                printed = None
                continue
            assert not printed, f"python block before block {number} printed output that the page does not show"
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(body, f"block {number}", "exec"), namespace)
            printed = out.getvalue()
        assert not printed, "the last python block printed output that the page does not show"
    finally:
        os.chdir(previous)
    return results


@pytest.mark.parametrize("page", PAGES)
def test_the_page_prints_what_it_shows(page, tmp_path, smollm2_folder):
    _, markdown, _, _ = read_page(page)
    results = run_page(markdown, tmp_path)
    assert results, f"{page} shows no output"
    for block, printed in results:
        assert printed == block.group(2), f"{page} line {markdown[: block.start()].count(chr(10)) + 1}"
    assert list(tmp_path.glob("*.png")), f"{page} draws no picture"


def update(page: str) -> None:
    """Rerun a page and write what it printed into its text blocks."""
    whole, markdown, start, end = read_page(page)
    path = ROOT / page.partition("#")[0]
    pictures = DOCS / Path(page).stem
    if f"]({pictures.name}/" not in markdown:  # the page shows no picture: keep none
        pictures = Path(tempfile.mkdtemp())
    pictures.mkdir(exist_ok=True)
    for block, printed in reversed(run_page(markdown, pictures)):
        markdown = markdown[: block.start(2)] + printed + markdown[block.end(2) :]
    path.write_text(whole[:start] + markdown + whole[end:], encoding="utf-8")


if __name__ == "__main__":
    for name in sys.argv[1:] or PAGES:
        update(name)
