"""The import rules of src/embedkit, read from the source with ``ast`` (no module is imported).

(a) No module imports another module's private name (``from X import _name``, or ``X._name`` on a
    module bound by an import): a name shared across modules gets a public name.
(b) No import cycle between modules, counting every import statement (module level and inside
    functions; ``if TYPE_CHECKING:`` blocks are left out, they never run).

The layer contracts themselves are checked by import-linter (``[tool.importlinter]`` in
pyproject.toml, ``make lint``); this test keeps the two rules above true without it.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "embedkit"

# Known violations: none. Keep these empty; an entry must name an exact import (the test fails on
# an entry that no longer occurs).
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()
KNOWN_CYCLES: set[frozenset[str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST):
    """Every node under ``node``, skipping ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield other
                yield from _walk(other)
            continue
        yield child
        yield from _walk(child)


class _Imports:
    """What one module imports: modules (edges), names taken from modules, module aliases."""

    def __init__(self, name: str, path: Path, modules: dict[str, Path]) -> None:
        self.name = name
        self.edges: set[str] = set()
        self.private: list[tuple[str, str, int]] = []  # (from module, private name, line)
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        aliases: dict[str, str] = {}  # local name -> embedkit module
        for node in _walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = self._known(alias.name, modules)
                    if target:
                        self.edges.add(target)
                        if alias.asname:
                            aliases[alias.asname] = target
                        if any(part.startswith("_") for part in alias.name.split(".")[1:]):
                            self.private.append((target, alias.name, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:  # "from package import module"
                        self.edges.add(sub)
                        aliases[alias.asname or alias.name] = sub
                        continue
                    target = self._known(base, modules)
                    if target:
                        self.edges.add(target)
                        if _private(alias.name) and target != name:
                            self.private.append((target, alias.name, node.lineno))
        for node in _walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _private(node.attr)
                and aliases[node.value.id] != name
            ):
                self.private.append((aliases[node.value.id], node.attr, node.lineno))
        self.edges.discard(name)

    @staticmethod
    def _known(dotted: str, modules: dict[str, Path]) -> str | None:
        """The embedkit module ``dotted`` names (or the closest package above it)."""
        parts = dotted.split(".")
        while parts:
            candidate = ".".join(parts)
            if candidate in modules:
                return candidate
            parts.pop()
        return None


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _graph() -> dict[str, _Imports]:
    modules = _modules()
    return {name: _Imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[frozenset[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def _path_in(component: frozenset[str], graph: dict[str, set[str]]) -> list[str]:
    """One cycle through ``component``, for the failure message."""
    start = min(component)
    seen = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node] & component):
            if child == start:
                return [*seen[node], start]
            if child not in seen:
                seen[child] = [*seen[node], child]
                queue.append(child)
    return sorted(component)


def test_the_walk_sees_every_module_and_the_known_edges():
    graph = _graph()
    assert "embedkit.engine.embedder" in graph and "embedkit.cli" in graph
    assert "embedkit.errors" in graph["embedkit.engine.embedder"].edges
    assert "embedkit.errors" in graph["embedkit.cli"].edges
    # function-level imports count: the embed command imports the batch job inside run()
    assert "embedkit.batch" in graph["embedkit.commands.embed"].edges


def test_no_module_imports_another_modules_private_names():
    found = {
        (module, target, name): line
        for module, imports in _graph().items()
        for target, name, line in imports.private
    }
    new = sorted(
        f"{m}:{line} takes {n} from {t}"
        for (m, t, n), line in found.items()
        if (m, t, n) not in KNOWN_PRIVATE_IMPORTS
    )
    assert not new, "private names imported across modules (give them public names):\n" + "\n".join(new)
    stale = sorted(str(k) for k in KNOWN_PRIVATE_IMPORTS - set(found))
    assert not stale, "fixed: remove from KNOWN_PRIVATE_IMPORTS:\n" + "\n".join(stale)


def test_no_import_cycles_between_modules():
    edges = {name: imports.edges for name, imports in _graph().items()}
    cycles = _cycles(edges)
    new = [" -> ".join(_path_in(c, edges)) for c in cycles if c not in KNOWN_CYCLES]
    assert not new, "import cycles:\n" + "\n".join(new)
    stale = [sorted(c) for c in KNOWN_CYCLES - set(cycles)]
    assert not stale, f"fixed: remove from KNOWN_CYCLES: {stale}"


def test_the_checks_catch_what_they_are_for(tmp_path):
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    pkg = tmp_path / "embedkit"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "one.py").write_text("def _helper():\n    pass\n")
    (pkg / "two.py").write_text(
        "import embedkit.one as one\n\ndef f():\n    from embedkit.one import _helper\n    return one._helper\n"
    )
    modules = {_module_name_at(p, tmp_path): p for p in pkg.rglob("*.py")}
    got = _Imports("embedkit.two", pkg / "two.py", modules)
    assert got.edges == {"embedkit.one"}
    assert sorted(n for _, n, _ in got.private) == ["_helper", "_helper"]


def _module_name_at(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)
