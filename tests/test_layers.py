"""The import graph of ``dit_accel`` follows its layers (DESIGN.md): dependencies point down only.

Read from the source (an AST walk over every import, function-level ones included), not from what
happens to be imported at run time. A unit is a subpackage (``runtime``, ``caching``, ...) or a
top-level module (``api``, ``policy``, ...).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import dit_accel

ROOT = Path(dit_accel.__file__).parent

# Lowest first; a unit may import units of its own layer or below (never a cycle, see below).
LAYERS: list[set[str]] = [
    {"config", "context", "outputs", "batching", "stats", "inspection", "calibrated_for", "sidecar", "presets",
     "logging", "compile_config", "guardrail_config", "memory_config", "policy_folder"},
    {"adapters", "kernels"},
    {"attention", "quant", "caching"},
    {"policy"},
    {"runtime"},
    {"api"},
    {"calibration", "testing", "zoo", "sampling"},
    {"eval", "demo", "cli", "__init__"},
]


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """Fully qualified ``dit_accel`` modules that ``path`` imports."""
    rel = path.relative_to(ROOT.parent).with_suffix("")
    package = list(rel.parts if path.name == "__init__.py" else rel.parts[:-1])
    if path.name == "__init__.py":
        package = package[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "dit_accel")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "dit_accel":
                # `from . import x` / `from .pkg import mod`: the names may be modules
                out.add(target if node.module else target + "." + node.names[0].name)
    return out


def unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if path.name == "__init__.py" else rel.parts)
        source = _unit(name) if "." in name else "__init__"
        for target in _imports(path):
            dest = _unit(target)
            if dest != source:
                graph[source].add(dest)
        graph.setdefault(source, set())
    return graph


def test_every_unit_has_a_layer():
    known = set().union(*LAYERS)
    assert set(unit_graph()) <= known, f"units without a layer: {sorted(set(unit_graph()) - known)}"


def test_dependencies_point_down():
    layer = {unit: i for i, units in enumerate(LAYERS) for unit in units}
    upward = [(src, dst) for src, dsts in unit_graph().items() for dst in dsts if layer[dst] > layer[src]]
    assert not upward, f"imports of a higher layer: {sorted(upward)}"


def test_no_cycle_between_units():
    graph = unit_graph()
    seen, stack, cycles = set(), [], []

    def visit(node, path):
        if node in path:
            cycles.append(path[path.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])

    for unit in sorted(graph):
        visit(unit, stack)
    assert not cycles, f"import cycles: {cycles}"


def test_methods_adapters_and_kernels_never_import_the_layers_above():
    """The issue's rule, spelled out: no module under caching/, adapters/ or kernels/ imports api,
    calibration or the runtime."""
    graph = unit_graph()
    for unit in ("caching", "adapters", "kernels"):
        assert not graph[unit] & {"api", "calibration", "runtime"}, (unit, graph[unit])
