"""The code's rooms and their doors: no import cycle anywhere, the engine imports nothing of
the service, the API or Celery, and shared/ never imports api/, workers/ or beat/.

Imports are read from the source (module level and inside functions alike: a lazy import is
still a dependency); only ``if TYPE_CHECKING:`` blocks are left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("api", "shared", "workers", "beat")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported(name: str, path: Path) -> Iterator[str]:
    """The modules ``name`` (at ``path``) imports, absolute."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    stack: list[ast.AST] = [ast.parse(path.read_text())]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = {target for target in imported(name, path) if target in known and target != name}
        edges[name] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root, first in edges.items():
        if root in index:
            continue
        work = [(root, iter(sorted(first)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_anywhere() -> None:
    edges = graph()
    assert len(edges) > 80
    assert cycles(edges) == []


def test_the_engine_imports_nothing_of_the_service_the_api_or_celery() -> None:
    allowed_outside = {"shared", "shared.errors", "shared.failpoints", "shared.config", "shared.envnames"}
    allowed_outside |= {"shared.ratelimit"}
    allowed_outside |= {"shared.forksafe"}  # standard library only, like failpoints
    known = modules()
    for name, path in known.items():
        if not name.startswith("shared.repository"):
            continue
        for target in imported(name, path):
            if target in known and not target.startswith("shared.repository"):
                assert target in allowed_outside, f"{name} imports {target}"
            assert not target.startswith(("celery", "kombu", "fastapi", "sqlalchemy")), f"{name} imports {target}"


def test_shared_never_imports_the_processes_above_it() -> None:
    for name, path in modules().items():
        if name.startswith("shared"):
            for target in imported(name, path):
                assert not target.startswith(("api", "workers", "beat")), f"{name} imports {target}"


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_rest_commands_load_no_catalog_and_no_sqlalchemy() -> None:
    """``blockvault <resource> <verb>`` is a client of the API, run as a process per command (by
    the hundreds in the suite): the catalog's models and SQLAlchemy are none of its business
    (they were 0.5 of its 0.75 CPU s of imports, through the access keys' signing)."""
    modules = ", ".join(f"api.cli.{name}" for name in ("resources", "protection", "files", "accesskeys"))
    modules += ", api.cli.databases, api.cli.notifications"
    loaded = "sorted(m for m in sys.modules if m.startswith(('sqlalchemy', 'shared.catalog')))"
    program = f"import sys, {modules}\nprint({loaded})"
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout
