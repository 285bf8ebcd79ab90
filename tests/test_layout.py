"""The package's shape: layers that only import downwards, no import cycle, small modules and
functions, and a package map (docs/architecture.md) that names only modules that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "nanoengine"
MAP = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
# Each layer may import its own and lower layers only (the top-level modules errors, threads and
# params are the base everything stands on; the package's __init__ re-exports the public names).
LAYERS = {
    "base": 0, "model": 1, "weights": 2, "engine": 2, "research": 3, "api": 4,
    "server": 5, "evaluation": 5, "batch": 5, "ray": 5, "cli": 6,
}  # fmt: skip
# The one import that runs up, made when called: `llm.run_batch` is the batch job's Python face
# (what a user of the handle looks for), and the job reads OpenAI lines with the server's mapping.
UPWARD_ALLOWED = {("api.llm", "batch.job")}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    """Dotted names (under nanoengine) of every module, with their files."""
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that `name` imports, lazily inside functions too."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            stem = base + (node.module.split(".") if node.module else [])
            for alias in node.names:
                candidate = ".".join(stem + [alias.name])
                targets.add(candidate if candidate in known else ".".join(stem))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nanoengine"):
            targets.add(node.module.removeprefix("nanoengine").lstrip("."))
    return {t for t in targets if t in known and t != name}


def runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:` (for annotations only: not imported when run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
        yield node


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def layer(name: str) -> int:
    top = name.split(".")[0]
    return LAYERS.get(top, LAYERS["base"]) if name else -1


def test_no_import_cycle():
    edges = graph()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])


def test_every_import_runs_down_the_layers():
    upward = [
        f"{name} ({name.split('.')[0]}) imports {target}"
        for name, targets in graph().items()
        if name not in ("", "__main__")  # the package itself re-exports the public names
        for target in targets
        if layer(target) > layer(name) and (name, target) not in UPWARD_ALLOWED
    ]
    assert upward == []


def test_no_module_is_long():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_is_long():
    long = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name, path in modules().items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_the_package_map_names_only_modules_that_exist():
    text = MAP.read_text()
    cited = set(re.findall(r"`((?:[a-z_]+/)*[a-z_0-9]+\.py)`", text))
    assert len(cited) >= 20, "the map should name the package's modules"
    missing = sorted(c for c in cited if not (SRC / c).exists() and not (SRC.parents[1] / c).exists())
    assert missing == []


def test_the_package_map_names_every_module():
    text = MAP.read_text()
    unnamed = sorted(
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if path.name != "__init__.py" and f"`{path.relative_to(SRC)}`" not in text
    )
    assert unnamed == []


def test_one_tokens_path_is_at_most_six_modules_each_visited_once():
    """The map's "One token's path" section lists the modules a token passes through, in order."""
    section = MAP.read_text().split("## One token's path", 1)[1].split("\n## ", 1)[0]
    path = re.findall(r"^\d+\. `([a-z_/0-9]+\.py)`", section, flags=re.M)
    assert 2 <= len(path) <= 6
    assert len(set(path)) == len(path), "a module is returned to"
    assert all((SRC / module).exists() for module in path)
