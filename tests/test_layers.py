"""The layering rules of docs/architecture.md, checked on the source: the harness imports no
study, studies never import each other, and no two modules import each other (directly or round
a circle), not even inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "effattn"
STUDIES = ("effattn.sweep", "effattn.quality", "effattn.fidelity", "effattn.peers")
ABOVE_HARNESS = (*STUDIES, "effattn.commands", "effattn.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """The effattn modules ``path`` imports anywhere in it but type-checking blocks
    (``from a import b``: a.b too where that is a module)."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in MODULES}


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (imports for type hints
    only, which never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        yield node
        yield from _runtime_nodes(node)


def within(name: str, packages: tuple[str, ...]) -> str | None:
    return next((p for p in packages if name == p or name.startswith(p + ".")), None)


@pytest.mark.parametrize("name", [n for n in MODULES if n.startswith("effattn.harness")])
def test_the_harness_imports_no_study(name):
    above = sorted(m for m in imports(MODULES[name]) if within(m, ABOVE_HARNESS))
    assert not above, f"{name} imports {above}: the harness must not depend on a study"


@pytest.mark.parametrize("name", [n for n in MODULES if within(n, STUDIES)])
def test_studies_do_not_import_each_other(name):
    own = within(name, STUDIES)
    others = sorted(m for m in imports(MODULES[name]) if within(m, STUDIES) not in (None, own))
    assert not others, f"{name} imports {others}: studies share code through effattn.harness"


def test_no_import_circle():
    packages = {n for n, p in MODULES.items() if p.name == "__init__.py"}
    graph = {
        name: {m for m in imports(path) if m not in packages} for name, path in MODULES.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (circle := visit(dep)):
                return circle
        path.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            circle = visit(name)
            assert circle is None, "import circle: " + " -> ".join(circle)
