"""The import layering of salf: no import cycles, and each subpackage imports only the ones below it.

Every ``import`` of every module is read with ``ast``, the ones inside functions included (a lazy import
is still a dependency), plus the CLI's dispatch table (``salf.cli.HANDLERS``, resolved by importlib).
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterable
from pathlib import Path

import pytest

import salf

ROOT = Path(salf.__file__).parent

# Group of a module: the longest matching name (a subpackage covers everything inside it; the package
# root ``salf`` itself is base, but a new top-level module must be placed here by name). Names of modules
# that do not exist (yet) are harmless: only the modules found are looked up.
GROUPS = {
    "salf.compat": "base",
    "salf.errors": "base",
    "salf.fileio": "base",
    "salf.registry": "base",
    "salf.table": "base",
    "salf.data": "data",
    "salf.models": "models",
    "salf.method": "method",
    "salf.training": "training",
    "salf.config": "base",
    "salf.api": "commands",
    "salf.commands": "commands",
    "salf.commands.bench": "cli",  # the benchmark's commands sit above the benchmark
    "salf.commands.bench_table": "cli",
    "salf.export": "commands",
    "salf.report": "commands",
    "salf.bench": "bench",
    "salf.cli": "cli",
}
# What each group may import besides itself: the pipeline's stages, bottom to top.
BELOW = {
    "base": set(),
    "data": {"base"},
    "models": {"base"},
    "method": {"base", "data", "models"},
    "training": {"base", "data", "models", "method"},
    "commands": {"base", "data", "models", "method", "training"},
    "bench": {"base", "data", "models", "method", "training", "commands"},
    "cli": {"base", "data", "models", "method", "training", "commands", "bench"},
}


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package under ``root`` by dotted name (a package by its ``__init__.py``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _resolve(name: str, modules: Iterable[str]) -> str | None:
    """The module an imported dotted name lives in (its longest prefix that is a module)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its source (top level or in functions)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(_resolve(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: counted from this module's package
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(_resolve(f"{base}.{alias.name}", modules) or _resolve(base, modules))
    found.discard(None)
    found.discard(module)
    return found


def cli_handlers() -> set[str]:
    """Modules named in the CLI's ``HANDLERS`` table ("module:function" strings, imported by importlib)."""
    from salf.cli import HANDLERS  # imports no torch: the table is built from the options alone

    return {target.split(":")[0] for target in HANDLERS.values()}


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    modules = module_names(root, package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def group_of(module: str) -> str | None:
    if module == "salf":
        return "base"
    name = _resolve(module, GROUPS)
    return GROUPS[name] if name else None


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in sorted(graph.items()):
        group = group_of(module)
        for target in sorted(targets):
            if group_of(target) != group and group_of(target) not in BELOW[group]:
                out.append(f"{module} ({group}) imports {target} ({group_of(target)})")
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    g = import_graph(ROOT, "salf")
    g["salf.cli"] |= cli_handlers()
    return g


def test_every_module_has_a_layer(graph):
    assert not [m for m in graph if group_of(m) is None], "add the new module's group to GROUPS"


def test_no_import_cycles(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_each_subpackage_imports_only_the_stages_below_it(graph):
    assert layering_violations(graph) == []


def test_the_method_never_imports_training_benchmark_or_cli_code(graph):
    method = {m: targets for m, targets in graph.items() if group_of(m) == "method"}
    assert len(method) > 5
    bad = {m: t for m, targets in method.items() for t in targets if group_of(t) in ("training", "bench", "cli")}
    assert bad == {}


def test_the_graph_sees_imports_inside_functions_and_the_cli_dispatch(graph):
    assert "salf.method.cost_profile" in graph["salf.bench.taskbench"]  # imported inside a method
    assert "salf.commands.train" in graph["salf.cli"]  # only named in HANDLERS


def test_the_checker_fails_on_a_cycle_and_on_an_upward_import(tmp_path):
    """A package whose modules import each other (once only inside a function) is caught."""
    pkg = tmp_path / "salf"
    for name, source in {
        "__init__.py": "",
        "method/__init__.py": "",
        "method/plan.py": "from salf.method import freeze\n",
        "method/freeze.py": "def apply():\n    from salf.training.trainer import fit\n",
        "training/__init__.py": "",
        "training/trainer.py": "from salf.method.plan import Plan\n",
    }.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(textwrap.dedent(source))
    g = import_graph(pkg, "salf")
    assert g["salf.method.freeze"] == {"salf.training.trainer"}
    cycle = find_cycle(g)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert set(cycle) == {"salf.method.plan", "salf.method.freeze", "salf.training.trainer"}
    assert layering_violations(g) == ["salf.method.freeze (method) imports salf.training.trainer (training)"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_public_names_at_the_package_root_resolve():
    """``salf.apply_plan`` etc. are loaded on first use (importing salf stays cheap), from their modules."""
    for name, module in salf.PUBLIC.items():
        assert group_of(module) in ("base", "method", "training", "commands"), module
        assert getattr(salf, name) is getattr(__import__(module, fromlist=[name]), name)
