"""The shape of the code: the import ladder of DESIGN.md, no module cycles, small functions.

Every ``import`` in ``moeblocks/`` and ``kernels/src/`` (``moeblocks.kernels``) is read
with ``ast``, at module level and inside functions alike, and resolved to the module it
loads. The ladder, from the top:

    cli → sra → hf, inspect (hf may use inspect; inspect knows no model and no hf)
        → distributed → layer.py → components → routing.py (records) → private helpers

``kernels/`` and ``runtime/`` are side floors: anyone may import them, they import
nothing above them. Nothing inside the package imports the package face ``moeblocks``.
The checks are plain functions, each tested on a synthetic bad graph, so the test can fail.
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"moeblocks": ROOT / "moeblocks", "moeblocks.kernels": ROOT / "kernels" / "src"}

# Floors by rank; a module may import its own floor and the ones below it.
RANKS = {
    "base": 0,  # _version, _checks, _optional: helpers every floor may use
    "records": 1,
    "components": 2,
    "layer": 3,
    "face": 4,  # moeblocks/__init__.py: what users import; nothing inside imports it
    "distributed": 5,
    "inspect": 6,
    "hf": 6,
    "sra": 7,
    "cli": 8,
}
SIDE = {"kernels": {"kernels"}, "runtime": {"runtime", "base"}}  # side floor -> may import
SIDEWAYS_ALLOWED = {("hf", "inspect")}  # hf/ may use inspect's model-agnostic report
BASE = {"moeblocks._version", "moeblocks._checks", "moeblocks._optional"}
# Old module paths kept importable for one release (DeprecationWarning); they re-export runtime/.
SHIMS = {"moeblocks.threads": "runtime", "moeblocks.malloc": "runtime"}

MAX_LINES = 80  # STYLE.md 16: no function over 80 lines outside the kernel launchers


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (packages by their own name)."""
    found = {}
    for package, root in SOURCES.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def floor(name: str) -> str:
    """The ladder floor of a module of the package."""
    if name == "moeblocks":
        return "face"
    if name in BASE:
        return "base"
    if name in SHIMS:
        return SHIMS[name]
    top = name.split(".")[1]
    named = {"kernels", "runtime", "distributed", "inspect", "hf", "sra", "cli"}
    if top in named:
        return top
    # adapters.py wraps MoELayer for tensor-only slots: it sits on the layer floor.
    return {"routing": "records", "layer": "layer", "adapters": "layer"}.get(top, "components")


def _imported(node: ast.AST, name: str, is_package: bool, known: Mapping[str, Path]) -> set[str]:
    """The package modules one import statement loads (the nearest known module of each)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = name.split(".")[: len(name.split(".")) - node.level + int(is_package)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        # `from pkg import sub` loads the submodule; `from mod import Name` loads mod.
        subs = [f"{module}.{alias.name}" for alias in node.names]
        targets = [s for s in subs if s in known]
        if len(targets) < len(subs):
            targets.append(module)
    else:
        return set()
    out = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target:
            out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of the package it imports``, from every import statement."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        edges: set[str] = set()
        for node in ast.walk(tree):
            edges |= _imported(node, name, path.name == "__init__.py", known)
        graph[name] = edges - {name}
    return graph


def _allowed(src: str, dst: str) -> bool:
    a, b = floor(src), floor(dst)
    if b == "face":
        return False  # inside the package, import modules, never the package face
    if a in SIDE:
        return b in SIDE[a]
    if b in SIDE:
        return True
    return (a, b) in SIDEWAYS_ALLOWED or RANKS[b] < RANKS[a] or a == b


def ladder_violations(graph: Mapping[str, set[str]]) -> list[str]:
    """Every edge that runs up or sideways against the ladder, as ``src -> dst``."""
    return sorted(
        f"{src} ({floor(src)}) -> {dst} ({floor(dst)})"
        for src, dsts in graph.items()
        for dst in dsts
        if not _allowed(src, dst)
    )


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def long_functions(paths: Mapping[str, Path], limit: int = MAX_LINES) -> Iterator[str]:
    """``module.function: N lines`` for every function (or method) over ``limit`` lines."""
    for name, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > limit:
                    yield f"{name}.{node.name} (line {node.lineno}): {lines} lines"


# --- the tree holds the ladder --------------------------------------------------------------


def test_every_import_follows_the_ladder() -> None:
    assert ladder_violations(import_graph()) == []


def test_no_module_cycles() -> None:
    assert cycles(import_graph()) == []


def test_no_function_over_80_lines() -> None:
    library = {n: p for n, p in modules().items() if not n.startswith("moeblocks.kernels")}
    assert list(long_functions(library)) == []


def test_the_graph_sees_imports_inside_functions() -> None:
    # The CLI handlers and the Triton dispatchers import inside functions, and the kernels
    # import each other relatively: the graph must hold those edges too.
    graph = import_graph()
    assert "moeblocks.sra.inspection" in graph["moeblocks.cli.inspect"]  # inside _inspect_run
    assert "moeblocks.kernels" in graph["moeblocks.triton_dispatch"]  # inside a method
    assert "moeblocks.kernels.permute" in graph["moeblocks.kernels.autograd"]  # relative


# --- the checks can fail ----------------------------------------------------------------


def test_checks_catch_synthetic_bad_edges() -> None:
    bad = {
        "moeblocks.routing": {"moeblocks.layer"},  # upward
        "moeblocks.inspect.report": {"moeblocks.sra.model", "moeblocks.hf.capture"},  # up, sideways
        "moeblocks.sra.train": {"moeblocks"},  # the package face
        "moeblocks.runtime.errors": {"moeblocks.routers"},  # a side floor importing a block
        "moeblocks.kernels.permute": {"moeblocks._checks"},  # kernels import kernels only
        "moeblocks.layer": {"moeblocks.cli"},  # nothing imports the CLI
    }
    found = ladder_violations(bad)
    assert len(found) == 7, found
    fine = {
        "moeblocks.hf.report": {"moeblocks.inspect.report", "moeblocks.runtime.errors"},
        "moeblocks.cli.run": {"moeblocks.sra.train"},
        "moeblocks.triton_dispatch": {"moeblocks.kernels", "moeblocks.dispatch"},
    }
    assert ladder_violations(fine) == []


def test_cycles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_long_functions_are_found(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    path = tmp_path / "m.py"
    path.write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n")
    assert [s.split(" ")[0] for s in long_functions({"m": path})] == ["m.long"]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("moeblocks.threads", "moeblocks.runtime.threads"),
        ("moeblocks.malloc", "moeblocks.runtime.malloc"),
        ("moeblocks.sra.durable", "moeblocks.runtime.durable"),
    ],
)
def test_old_module_paths_warn_and_reexport(old: str, new: str) -> None:
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    moved = importlib.import_module(new)
    assert module.__all__ == moved.__all__
    assert all(getattr(module, name) is getattr(moved, name) for name in module.__all__)
