"""The package layout keeps its arrows one way: no import cycle between kd's packages and root modules.

Every import counts, also those inside functions and under ``TYPE_CHECKING``: a cycle hidden behind a lazy
import is still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

KD = ROOT / "kd"


def unit_of(module: str) -> str:
    """The layout unit a dotted module belongs to: ``kd.weights.files`` -> ``kd.weights``, ``kd.module`` itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def kd_modules() -> set[str]:
    return {module_name(path) for path in KD.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """The kd modules ``path`` imports; ``from kd.data import sampling`` counts as ``kd.data.sampling``."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    modules = kd_modules()
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules
            found |= submodules or {base}
    return {name for name in found if name == "kd" or name.startswith("kd.")}


def module_graph() -> dict[str, set[str]]:
    """Module -> the kd modules it imports. A package's ``__init__`` re-exports its modules, so an import of the
    package from inside it is not counted (it would make every re-export a cycle)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(KD.rglob("*.py")):
        name = module_name(path)
        own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {target for target in imported_modules(path) if target not in (name, own_package, "kd")}
    return graph


def unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(KD.rglob("*.py")):
        unit = unit_of(module_name(path))
        targets = {unit_of(name) for name in imported_modules(path)} - {unit, "kd"}
        graph.setdefault(unit, set()).update(targets)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_kd_packages():
    graph = unit_graph()
    assert {"kd.weights", "kd.students", "kd.teachers", "kd.models", "kd.results", "kd.tasks"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_kd_modules():
    """Also inside a package: kd.data.base -> kd.data.unlabeled -> kd.data.imagefolder -> kd.data.base was one,
    hidden by lazy imports."""
    graph = module_graph()
    assert {"kd.data.base", "kd.data.unlabeled", "kd.data.image_files", "kd.module"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_below_the_tasks_reads_the_config():
    """The config stops at kd/tasks: below it, modules take typed arguments and objects."""
    below = ("data", "models", "weights", "teachers", "students", "losses", "training", "results")
    readers = [
        str(path.relative_to(ROOT))
        for package in below
        for path in sorted((KD / package).rglob("*.py"))
        if {"omegaconf", "hydra"} & {name.split(".")[0] for name in all_imports(path)}
    ]
    assert readers == [], f"these modules import omegaconf or hydra: {readers}"


def all_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module or "")
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_lower_packages_do_not_import_the_ones_above():
    """tasks -> module -> teachers / students / losses -> models / weights / data -> leaves."""
    graph = unit_graph()
    above = {
        "kd.models": {"kd.weights", "kd.teachers", "kd.students", "kd.tasks", "kd.module", "kd.data"},
        "kd.weights": {"kd.teachers", "kd.students", "kd.tasks", "kd.module", "kd.launch"},
        "kd.teachers": {"kd.students", "kd.tasks", "kd.module"},
        "kd.students": {"kd.teachers", "kd.tasks", "kd.module"},
        "kd.losses": {"kd.teachers", "kd.students", "kd.tasks", "kd.module"},
        "kd.module": {"kd.tasks"},
    }
    for unit, forbidden in above.items():
        assert not graph[unit] & forbidden, f"{unit} imports {sorted(graph[unit] & forbidden)}"
