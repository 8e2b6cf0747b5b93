"""The import graph has three floors (DESIGN.md; issue 13, item 7), checked on every module's import statements:

1. the shared core: every ``fedguard`` module except the composition layer; it imports no service and nothing of
   the composition layer;
2. the services: ``producers``, ``processors``, ``aggregator``; each imports the core and its own package only,
   never another service, never the composition layer;
3. the composition layer: the CLI, the embedded-stack launcher, the demo, the in-process simulation and
   the evaluation matrix (:data:`COMPOSITION`); it may import everything.

Imports are read with :mod:`ast` (at module level and inside functions alike), so a lazy import counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("producers", "processors", "aggregator")
COMPOSITION = {"fedguard.cli", "fedguard.stack", "fedguard.demo", "fedguard.simulation",
               "fedguard.evaluation_matrix", "fedguard.live_eval", "fedguard.annotator", "fedguard.watch"}


def modules() -> dict[str, Path]:
    found = {}
    for package in ("fedguard", *SERVICES):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path) -> set[str]:
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)  # `from fedguard import stack`
    return out


def floor(module: str) -> str:
    top = module.split(".")[0]
    if top in SERVICES:
        return top
    if any(module == m or module.startswith(m + ".") for m in COMPOSITION):
        return "composition"
    return "core" if top == "fedguard" else "external"


ALL = modules()


def test_the_composition_layer_is_what_the_design_names():
    assert COMPOSITION <= set(ALL), COMPOSITION - set(ALL)


@pytest.mark.parametrize("module", sorted(ALL))
def test_each_module_imports_only_from_its_floor_or_below(module):
    mine = floor(module)
    bad = []
    for target in imported(module, ALL[module]):
        theirs = floor(target)
        if theirs == "external" or mine == "composition":
            continue
        if mine == "core" and theirs != "core":
            bad.append(target)
        elif mine in SERVICES and theirs not in ("core", mine):
            bad.append(target)
    assert not bad, f"{module} ({mine}) imports {sorted(bad)}"
