"""The package's layering, checked on the source (every file under raysim/ parsed with ``ast``, nothing
imported or executed):

* only ``raysim/engine/`` imports ``ray``;
* ``raysim.strategies``, ``raysim.client``, ``raysim.privacy``, ``raysim.data`` and ``raysim.models`` do
  not import ``raysim.engine``;
* ``raysim.config`` (module or package) imports nothing of ours but ``raysim.errors`` (and itself);
* raysim's modules import one another without a cycle.

The first three rules count every import: at module level, inside a function, or under
``if TYPE_CHECKING:``, since each one is a dependency the layer must not have. The cycle rule counts the
imports that run when a module is imported: those at module level (class bodies, ``try`` and ``if``
blocks included) but not under ``if TYPE_CHECKING:``, which never runs, nor inside a function, which runs
only when called, by which time both modules are loaded; a function-level import is the documented way
to defer a dependency, so a cycle closed only by one is not a cycle here. A package's ``__init__`` is the
package, and importing ``a.b.c`` also runs the packages ``a.b`` (an edge to it) unless the importer lives
inside them (they are then already being imported). Relative imports are resolved against the
importing module's package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "raysim"

LOWER_LAYERS = ("strategies", "client", "privacy", "data", "models")


@dataclass(frozen=True)
class Import:
    """One imported module: who imports it, where, and whether the import runs at import time."""

    importer: str  # dotted module name; a package's __init__ is the package
    target: str  # dotted name as resolved (ours: the most specific module of the tree it names)
    file: str  # path relative to the tree's parent, e.g. raysim/engine/pool.py
    line: int
    eager: bool  # runs when the importer is imported (module level, not under TYPE_CHECKING)

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name → file of every module of the package at ``root``."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of ``tree`` with whether it runs at import time."""

    def visit(node: ast.AST, eager: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, eager
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            eager = False
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from visit(child, False)
            for child in node.orelse:
                yield from visit(child, eager)
            return
        for child in ast.iter_child_nodes(node):
            yield from visit(child, eager)

    yield from visit(tree, True)


def _known(name: str, modules: dict[str, Path]) -> str:
    """The most specific module of the tree that ``name`` names (``name`` itself when it is not ours)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return name


def imports(root: Path) -> list[Import]:
    """Every import of every module under ``root``, relative imports resolved."""
    modules = module_names(root)
    found = []
    for importer, path in modules.items():
        file = path.relative_to(root.parent).as_posix()
        package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        for node, eager in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=file)):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                # `from a import b` imports the module a.b when there is one, else a name of a
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in dict.fromkeys(targets):
                found.append(Import(importer, _known(target, modules), file, node.lineno, eager))
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def ray_outside_engine(found: list[Import], top: str = "raysim") -> list[str]:
    return [f"{i.where()}: {i.importer} imports {i.target}" for i in found
            if _within(i.target, "ray") and not _within(i.importer, f"{top}.engine")]


def lower_layers_on_engine(found: list[Import], top: str = "raysim") -> list[str]:
    return [f"{i.where()}: {i.importer} imports {i.target}" for i in found
            if any(_within(i.importer, f"{top}.{layer}") for layer in LOWER_LAYERS) and _within(i.target, f"{top}.engine")]


def config_on_ours(found: list[Import], top: str = "raysim") -> list[str]:
    allowed = (f"{top}.config", f"{top}.errors")
    return [f"{i.where()}: {i.importer} imports {i.target}" for i in found
            if _within(i.importer, f"{top}.config") and _within(i.target, top)
            and not any(_within(i.target, a) for a in allowed)]


def import_graph(found: list[Import], modules: dict[str, Path]) -> dict[str, dict[str, Import]]:
    """module → {module it imports at import time: the import that does it}, package ``__init__``s included."""
    graph: dict[str, dict[str, Import]] = {name: {} for name in modules}
    for i in found:
        if not i.eager or i.target not in modules:
            continue
        parts = i.target.split(".")
        for end in range(1, len(parts) + 1):  # a.b.c runs a, a.b and a.b.c
            name = ".".join(parts[:end])
            if name in modules and name != i.importer and not _within(i.importer, name):
                graph[i.importer].setdefault(name, i)
    return graph


def cycles(root: Path) -> list[str]:
    """One line per import on a cycle, grouped by strongly connected component (Tarjan)."""
    modules = module_names(root)
    graph = import_graph(imports(root), modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:  # recursive: the graph is a few hundred modules deep at most
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            connect(name)
    lines = []
    for component in components:
        lines.append(f"cycle among {', '.join(component)}:")
        for module in component:
            for succ, i in sorted(graph[module].items()):
                if succ in component:
                    shown = succ if succ == i.target else f"{succ} (importing {i.target})"
                    lines.append(f"  {i.where()}: {module} imports {shown}")
    return lines


def _message(rule: str, offending: list[str]) -> str:
    return f"{rule}:\n" + "\n".join(offending)


def test_only_the_engine_imports_ray():
    offending = ray_outside_engine(imports(ROOT))
    assert not offending, _message("only raysim/engine/ may import ray", offending)


def test_lower_layers_do_not_import_the_engine():
    offending = lower_layers_on_engine(imports(ROOT))
    assert not offending, _message(f"raysim.{{{','.join(LOWER_LAYERS)}}} may not import raysim.engine", offending)


def test_config_imports_nothing_of_ours_but_errors():
    offending = config_on_ours(imports(ROOT))
    assert not offending, _message("raysim.config may import nothing of raysim's but raysim.errors", offending)


def test_no_import_cycles():
    offending = cycles(ROOT)
    assert not offending, _message("raysim's modules import one another in a cycle", offending)


def _plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "raysim" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "raysim"


def test_the_checker_catches_planted_violations(tmp_path):
    tree = _plant(tmp_path, {
        "__init__.py": "def __getattr__(name):\n    from raysim.engine import run\n    return run\n",
        "errors.py": "",
        "engine/__init__.py": "import ray\nfrom raysim.engine.run import go\n",
        "engine/run.py": "from ..client import hooks\n",
        "client/__init__.py": "",
        "client/hooks.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from raysim.engine import run\n"
                           "def f():\n    import ray.util\n",
        "client/lazy.py": "from . import hooks\n\ndef f():\n    from raysim import engine\n",
        "config/__init__.py": "from raysim.errors import E\nfrom .blocks import B\n",
        "config/blocks.py": "from raysim import errors\n\ndef g():\n    from ..models import zoo\n",
        "models/__init__.py": "",
        "models/zoo.py": "from raysim.models.a import x\n",
        "models/a.py": "import raysim.models.zoo\n",
    })
    found = imports(tree)
    assert ray_outside_engine(found) == ["raysim/client/hooks.py:5: raysim.client.hooks imports ray.util"]
    assert lower_layers_on_engine(found) == [
        "raysim/client/hooks.py:3: raysim.client.hooks imports raysim.engine.run",
        "raysim/client/lazy.py:4: raysim.client.lazy imports raysim.engine",
    ]
    assert config_on_ours(found) == ["raysim/config/blocks.py:4: raysim.config.blocks imports raysim.models.zoo"]
    # models.zoo <-> models.a at module level is a cycle; engine -> client.hooks -> engine only under
    # TYPE_CHECKING and raysim -> engine -> ... -> raysim only in a function are not
    assert cycles(tree) == [
        "cycle among raysim.models.a, raysim.models.zoo:",
        "  raysim/models/a.py:1: raysim.models.a imports raysim.models.zoo",
        "  raysim/models/zoo.py:1: raysim.models.zoo imports raysim.models.a",
    ]


def test_a_cycle_through_a_package_init_counts(tmp_path):
    tree = _plant(tmp_path, {
        "__init__.py": "",
        "data/__init__.py": "from raysim.data.load import load\n",
        "data/load.py": "from raysim.models.zoo import build\n",
        "models/__init__.py": "",
        "models/zoo.py": "from raysim.data.text import tokens\n",  # runs raysim/data/__init__.py
        "data/text.py": "",
    })
    assert cycles(tree) == [
        "cycle among raysim.data, raysim.data.load, raysim.models.zoo:",
        "  raysim/data/__init__.py:1: raysim.data imports raysim.data.load",
        "  raysim/data/load.py:1: raysim.data.load imports raysim.models.zoo",
        "  raysim/models/zoo.py:1: raysim.models.zoo imports raysim.data (importing raysim.data.text)",
    ]


def test_a_clean_tree_passes(tmp_path):
    tree = _plant(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "config/__init__.py": "from raysim.errors import E\nfrom .blocks import B\n",
        "config/blocks.py": "from .. import errors\n",
        "engine/__init__.py": "import ray\nfrom raysim.client import hooks\n",
        "client/__init__.py": "",
        "client/hooks.py": "from raysim.config import Scenario\n",
    })
    found = imports(tree)
    assert not ray_outside_engine(found) and not lower_layers_on_engine(found) and not config_on_ours(found)
    assert not cycles(tree)
