"""The package's layers: no module imports from a higher layer, and no two units import each other.

The source is read with `ast`, never imported. Every import of `fedshop.…` counts, wherever it is: at
the top, inside a function (a lazy import is still a dependency, only a later one) or under
`if TYPE_CHECKING:` (a reader still has to know the other module to read the annotations).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "fedshop"

# Units (a subpackage, or a module directly under fedshop/), lowest layer first. A unit may import
# its own modules and any unit of a lower layer; units of one layer are siblings and import neither
# each other nor anything above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "errors", "seeding"),  # the version string, exceptions, seeded random streams
    # The registries of named choices. Their targets ("module:attribute" strings, imported on use)
    # point up to the code a name picks: a lookup by name at run time, not an import edge.
    ("choices",),
    ("config",),  # the validated run configuration, read by everything above
    ("storage",),  # the privacy ledger (its URL comes from the config layer)
    ("data",),  # loading, splitting, partitioning, evaluation negatives
    ("eval",),  # metrics only: attacks that train live in attacks/
    ("models",),
    ("messages",),  # fedshop/messages.py: the message and pipeline types privacy/ and secure/ share
    ("privacy", "secure"),  # stages on either side of the sum; neither needs the other
    ("fl",),  # the round: trains, aggregates through privacy/ and secure/
    (
        "cold_items",
    ),  # new products: held out before training, evaluated after (experiment calls it)
    # All four train through fl/ or on their own; none uses another (sequential: the SASRec
    # benchmark entry; vertical: feature-split learning between parties aligned by PSI).
    ("attacks", "experiment", "sequential", "vertical"),
    # Size and fit prediction's methods (issue 20) and the retail tasks' (issue 22): experiment's
    # result types, progress and record-level plan.
    ("fit_experiment", "retail_experiment"),
    ("deploy", "report"),  # deploy runs an experiment across processes; report renders a result
    # The sweep runs experiments and the membership attack, then writes its HTML through report/.
    ("sweep",),
    # The retail tasks' tables and scoring: their plots are drawn with report/'s helpers.
    ("retail_tasks",),
    # The shopping guide serves a finished run folder (report/ wrote it) to shoppers and operators.
    ("serve",),
    ("cli",),
    ("__main__",),  # `python -m fedshop` calls the CLI
)

LAYER_OF = {unit: level for level, units in enumerate(LAYERS) for unit in units}
Edge = tuple[str, str, int]  # importer module, imported module, line


def module_name(path: Path, root: Path) -> str:
    parts = (root.name, *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(root: Path) -> list[Edge]:
    """Every import of a module of the package under `root`, relative ones resolved."""
    package = root.name
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    edges = []
    for module, path in sorted(modules.items()):
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                # `from fedshop.x import y` names module fedshop.x.y when there is one.
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            else:
                continue
            for target in targets:
                if target == package or target.startswith(package + "."):
                    edges.append((module, target, node.lineno))
    return edges


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def climbing(edges: list[Edge], layer_of: dict[str, int]) -> list[str]:
    """The imports that reach a sibling or a higher layer, as readable lines."""
    out = []
    for importer, imported, line in edges:
        source, target = unit_of(importer), unit_of(imported)
        if source != target and layer_of[target] >= layer_of[source]:
            out.append(f"{importer}:{line} imports {imported} ({source} may not use {target})")
    return out


def unit_cycle(edges: list[Edge]) -> list[str] | None:
    """One cycle in the graph of units (self-imports aside), or None."""
    graph: dict[str, set[str]] = {}
    for importer, imported, _ in edges:
        source, target = unit_of(importer), unit_of(imported)
        if source != target:
            graph.setdefault(source, set()).add(target)
    done: set[str] = set()

    def visit(unit: str, path: list[str]) -> list[str] | None:
        if unit in path:
            return [*path[path.index(unit) :], unit]
        if unit in done:
            return None
        for target in sorted(graph.get(unit, ())):
            found = visit(target, [*path, unit])
            if found:
                return found
        done.add(unit)
        return None

    for unit in sorted(graph):
        found = visit(unit, [])
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return imports_of(SOURCE)


def test_every_unit_has_a_layer():
    units = {unit_of(module_name(p, SOURCE)) for p in SOURCE.rglob("*.py")}
    assert units - set(LAYER_OF) == set(), "place each new unit in LAYERS"
    assert set(LAYER_OF) - units == set(), "strike units that no longer exist from LAYERS"


def test_no_import_reaches_a_sibling_or_a_higher_layer(edges):
    assert climbing(edges, LAYER_OF) == []


def test_no_cycle_between_units(edges):
    cycle = unit_cycle(edges)
    assert cycle is None, "units import each other: " + " -> ".join(cycle or ())


def test_the_checks_catch_a_back_edge_and_a_cycle(tmp_path):
    """On a small package of the same shape: a lazy import and one under TYPE_CHECKING both count,
    relative imports resolve, and a cycle between two units is found."""
    root = tmp_path / "fedshop"
    (root / "data").mkdir(parents=True)
    (root / "fl").mkdir()
    (root / "__init__.py").write_text("")
    (root / "data" / "__init__.py").write_text("")
    (root / "fl" / "__init__.py").write_text("")
    (root / "fl" / "loop.py").write_text("from ..data import load\n")
    (root / "data" / "load.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from fedshop.fl.loop import x\n"
        "def f():\n    import fedshop.fl\n"
    )
    edges = imports_of(root)
    assert sorted(edges) == [
        ("fedshop.data.load", "fedshop.fl", 5),
        ("fedshop.data.load", "fedshop.fl.loop", 3),
        ("fedshop.fl.loop", "fedshop.data.load", 1),
    ]
    layers = {"data": 0, "fl": 1}
    assert [line.split(" (")[0] for line in climbing(edges, layers)] == [
        "fedshop.data.load:3 imports fedshop.fl.loop",
        "fedshop.data.load:5 imports fedshop.fl",
    ]
    assert unit_cycle(edges) == ["data", "fl", "data"]
    downward = [edge for edge in edges if edge[0] == "fedshop.fl.loop"]
    assert climbing(downward, layers) == [] and unit_cycle(downward) is None
