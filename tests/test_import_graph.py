"""The import graph of the node (triage_agent) and the detector (triage_model) has no cycle, and
keeps the contracts in pyproject.toml's [tool.importlinter] (run by hand with `lint-imports`).

Imports inside functions count: a cycle dodged by a function-level import is still a cycle.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("triage_agent", "triage_model")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def module_cycles(graph: grimp.ImportGraph, package: str) -> list[list[str]]:
    """Each cycle among the modules of ``package``, as the modules of one strongly connected
    component (Tarjan), sorted."""
    modules = sorted(m for m in graph.modules if m == package or m.startswith(package + "."))
    edges = {m: sorted(d for d in graph.find_modules_directly_imported_by(m) if d in modules)
             for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                cycles.append(sorted(component))

    for m in modules:
        if m not in index:
            visit(m)
    return sorted(cycles)


def describe(graph: grimp.ImportGraph, cycle: list[str]) -> str:
    """One loop through the cycle, e.g. ``a -> b -> a``, with the line of each import."""
    first, rest = cycle[0], cycle[1:]
    steps = []
    for other in rest:
        there = graph.find_shortest_chain(first, other) or ()
        back = graph.find_shortest_chain(other, first) or ()
        loop = list(there) + list(back)[1:]
        for a, b in zip(loop, loop[1:], strict=False):
            details = graph.get_import_details(importer=a, imported=b)
            where = ", ".join(f"line {d['line_number']}" for d in details) or "?"
            steps.append(f"{a} -> {b} ({where})")
        break
    return f"{' <-> '.join(cycle)}: " + "; ".join(steps)


def test_cycle_finder_finds_a_cycle() -> None:
    g = grimp.ImportGraph()
    for m in ("pkg", "pkg.a", "pkg.b", "pkg.c"):
        g.add_module(m)
    g.add_import(importer="pkg.a", imported="pkg.b", line_number=1, line_contents="import pkg.b")
    g.add_import(importer="pkg.b", imported="pkg.a", line_number=2, line_contents="import pkg.a")
    g.add_import(importer="pkg.c", imported="pkg.a", line_number=3, line_contents="import pkg.a")
    cycles = module_cycles(g, "pkg")
    assert cycles == [["pkg.a", "pkg.b"]]
    assert "pkg.a -> pkg.b (line 1); pkg.b -> pkg.a (line 2)" in describe(g, cycles[0])


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(graph: grimp.ImportGraph, package: str) -> None:
    cycles = module_cycles(graph, package)
    assert not cycles, "import cycles:\n" + "\n".join(describe(graph, c) for c in cycles)


def test_import_contracts_are_kept() -> None:
    """Runs `lint-imports` on pyproject.toml's contracts (the detector never imports the node;
    no cycles between sibling modules or packages; shared foundations import no stage)."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert "Contracts:" in r.stdout, r.stdout + r.stderr
    assert r.returncode == 0, r.stdout[r.stdout.find("Contracts"):] + r.stderr
