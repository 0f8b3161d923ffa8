"""The package's shape, as the README's "Read the code" describes it: a layer cake without circles,
functions that fit on a screen, and the reading path's line counts as the README states them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nanogpt"
README = PACKAGE.parent / "README.md"
MAX_FUNCTION_LINES = 60

# Bottom to top. A module imports only from its own layer or the layers below it, and never in a circle.
LAYERS = [
    ["errors", "atomic", "mfu"],  # the ground: no nanogpt imports
    ["model", "config", "data", "tokenizer", "device", "metrics"],
    ["generate", "optim", "memory", "distributed", "hf", "plot", "inspect_model"],  # on the model; plot: a command too
    ["checkpoint.file", "checkpoint.sharded", "checkpoint"],  # the formats, over the process layer
    ["inference", "train_options", "resume", "report"],  # the machinery the commands share
    # the commands
    ["train", "sample", "evaluate", "export", "consolidate", "prepare", "openwebtext", "bench"],
    ["serve.engine", "serve.app", "serve", "cli", "__main__", ""],  # "": the package's __init__
]
# nanoGPT's API: `model.generate(...)` stays as a delegate to generate.py, imported when it is called
ALLOWED_UPWARD = {("model", "generate")}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] == "configs":  # config files: assignments, no code
            continue
        found[".".join(p for p in parts if p != "__init__")] = path
    return found


def imports(path: Path, names: set[str]) -> set[str]:
    """The package modules `path` imports, at the top or inside a function (nanogpt. prefix dropped)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nanogpt":
            base = node.module.removeprefix("nanogpt").lstrip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}".lstrip(".")
                found.add(sub if sub in names else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("nanogpt").lstrip(".") for a in node.names if a.name.startswith("nanogpt")}
    return found & names


def test_every_module_has_a_layer() -> None:
    layered = [m for layer in LAYERS for m in layer]
    assert sorted(layered) == sorted(modules()), "add new modules to LAYERS"


def test_imports_never_run_up_a_layer() -> None:
    level = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    names = set(modules())
    upward = [
        f"{m} imports {d}"
        for m, path in modules().items()
        for d in sorted(imports(path, names) - {m})
        if level[d] > level[m] and (m, d) not in ALLOWED_UPWARD
    ]
    assert upward == []


def test_no_import_circle() -> None:
    names = set(modules())
    graph = {m: imports(p, names) - {m} for m, p in modules().items()}
    for a, b in ALLOWED_UPWARD:  # a function-level delegate: the circle is not run at import time
        graph[a].discard(b)
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            pytest.fail("import circle: " + " -> ".join([*path[path.index(m) :], m]))
        if m not in done:
            for d in sorted(graph[m]):
                visit(d, [*path, m])
            done.add(m)

    for m in sorted(graph):
        visit(m, [])


def test_no_function_longer_than_a_screen() -> None:
    long = [
        f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in modules().values()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_the_readmes_reading_path_is_true() -> None:
    """Every `nanogpt/<file>` line of the README's "Read the code" table states the file's real line count,
    and each file on the path says in its docstring where it sits."""
    section = README.read_text().split("## Read the code", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| *(\d+) *\| *`nanogpt/([\w/.]+)` *\| *(\d+) *\|", section, re.M)
    assert [int(step) for step, _, _ in rows] == sorted(int(step) for step, _, _ in rows) and len(rows) >= 5
    for _, name, lines in rows:
        text = (PACKAGE / name).read_text()
        assert int(lines) == len(text.splitlines()), f"README says nanogpt/{name} has {lines} lines"
        assert "read" in ast.get_docstring(ast.parse(text)).lower(), f"nanogpt/{name}'s docstring names no path"
