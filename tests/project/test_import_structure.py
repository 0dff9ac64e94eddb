"""smtpproxy's modules import each other without cycles.

The layout reads like the data path (inbound → chain → outcome → delivery); a cycle would
mean two modules that can only be understood together. The imports are read with ``ast``
(every ``import``/``from ... import`` of an ``smtpproxy`` module, also those inside
functions and ``TYPE_CHECKING`` blocks, which hide a cycle rather than remove it), and any
strongly connected group of more than one module fails the test with the path around it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "smtpproxy"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def test_the_graph_is_read() -> None:
    graph = import_graph()
    assert "smtpproxy.chain" in graph["smtpproxy.outcome"]
    assert "smtpproxy.inbound" in graph["smtpproxy.server"]


def test_no_import_cycle_inside_smtpproxy() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


MAX_MODULE_LINES = 900
"""Above this a module holds more than one job (issue 24's structure review)."""


def test_no_module_of_smtpproxy_is_over_900_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


FRONT_ENDS = ("smtpproxy.inbound", "smtpproxy.milter", "smtpproxy.tracer", "smtpproxy.server",
              "smtpproxy.cli")


def _reaches(module: str, graph: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        for found in graph[todo.pop()] - seen:
            seen.add(found)
            todo.append(found)
    return seen


def test_no_import_runs_upward() -> None:
    """The configuration and the conversation sit below every front end: neither reaches
    one (the milter's endpoint parser once made config import smtpproxy.milter), and the
    conversation knows no transport (no aiosmtpd, no milter packets)."""
    graph = import_graph()
    upward = {
        low: sorted(m for m in _reaches(low, graph) if m.startswith(FRONT_ENDS))
        for low in graph
        if low.startswith(("smtpproxy.config", "smtpproxy.conversation", "smtpproxy.outcome"))
    }
    assert {low: found for low, found in upward.items() if found} == {}
    conversation = ast.parse((PACKAGE / "conversation.py").read_text())
    imported = {a.name for n in ast.walk(conversation) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(conversation) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.startswith(("aiosmtpd", "smtpproxy.milter", "socket"))}
