"""The worked examples in docs/ run as written and print exactly what the pages show.

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

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ["look-inside.md", "readme-look-inside.md"]  # the second is a section for README.md
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
    markdown = (DOCS / page).read_text(encoding="utf-8")
    results = run_page(markdown, tmp_path)
    assert results, f"{page} shows no output"
    for block, printed in results:
        assert printed == block.group(2), f"{page} line {markdown[: block.start()].count(chr(10)) + 1}"
    assert list(tmp_path.glob("*.png")), f"{page} draws no picture"


def update(page: str) -> None:
    """Rerun a page and write what it printed into its text blocks."""
    path = DOCS / page
    markdown = path.read_text(encoding="utf-8")
    pictures = DOCS / Path(page).stem
    if f"]({pictures.name}/" not in markdown:  # the page shows no picture: keep none
        pictures = Path(tempfile.mkdtemp())
    pictures.mkdir(exist_ok=True)
    for block, printed in reversed(run_page(markdown, pictures)):
        markdown = markdown[: block.start(2)] + printed + markdown[block.end(2) :]
    path.write_text(markdown, encoding="utf-8")


if __name__ == "__main__":
    for name in sys.argv[1:] or PAGES:
        update(name)
