"""The package's structure: imports flow one way between layers, and there are no import cycles.

The folder of a module says which layer it belongs to (docs/design.md §5). From the bottom:

    errors, job.events  ->  config  ->  algorithm  ->  comm  ->  models, job.data (with
        job.hf_data, job.tokenizer)  ->  persist
        ->  job (train, inner, metrics, progress, engines), testing  ->  launchers, reports
        ->  bench, cli

A module may import modules of its own layer or of a lower one, never of a higher one. Every
import counts, also one inside a function (a lazy import is still a dependency), except those
under ``if TYPE_CHECKING:`` (annotations only). ``job.events`` is a leaf (it imports nothing
from the package) that any layer may emit through. Besides the order:

* the algorithm layer reaches the network only through its own seam: ``comm`` may import
  ``algorithm.reducer`` (the protocols it implements) and nothing else of ``algorithm``;
* the config layer imports no torch (configs are checked before any heavy import);
* no module is longer than 500 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "diloco"

#: Module (or package) name prefix -> layer; the longest matching prefix decides.
LAYERS: dict[str, int] = {
    "diloco.errors": 0,
    "diloco.files": 0,
    "diloco.job.events": 0,
    "diloco.config": 1,
    "diloco": 2,  # the package itself: its public API is the algorithm layer's
    "diloco.algorithm": 2,
    "diloco.comm": 3,
    "diloco.models": 4,
    "diloco.job.data": 4,
    "diloco.job.hf_data": 4,  # tokenized corpora: the data layer
    "diloco.job.tokenizer": 4,
    "diloco.persist": 5,
    "diloco.job": 6,
    "diloco.testing": 6,
    "diloco.launchers": 7,
    "diloco.reports": 7,
    "diloco.bench": 8,
    "diloco.cli": 8,
    "diloco.__main__": 8,
}
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    prefixes = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    assert prefixes, f"{module} is in no layer; add its folder to LAYERS"
    return LAYERS[max(prefixes, key=len)]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(node: ast.ImportFrom | ast.Import) -> set[str]:
    """The package modules an (absolute) import statement loads."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in MODULES}
    base = node.module or ""
    out = set()
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        if candidate in MODULES:
            out.add(candidate)  # ``from diloco.config import defaults``: the submodule
        elif base in MODULES:
            out.add(base)
    return out


def imports(module: str) -> set[str]:
    """The package modules ``module`` imports at run time (not under ``TYPE_CHECKING``)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{module}: use absolute imports (from diloco.… import …)")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update(_resolve(node))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return found


GRAPH: dict[str, set[str]] = {m: imports(m) for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


def test_every_module_belongs_to_a_layer():
    for module in MODULES:
        layer(module)


def test_the_module_import_graph_has_no_cycle():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH) or [])


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_from_higher_layers_to_lower_ones_only(module):
    upward = [t for t in sorted(GRAPH[module]) if layer(t) > layer(module)]
    assert not upward, f"{module} (layer {layer(module)}) imports " + ", ".join(
        f"{t} (layer {layer(t)})" for t in upward
    )


def test_comm_sees_the_algorithm_layer_only_through_its_reducer_seam():
    for module, targets in GRAPH.items():
        if module.startswith("diloco.comm"):
            algorithm = {t for t in targets if t.startswith("diloco.algorithm")}
            assert algorithm <= {"diloco.algorithm.reducer"}, (module, algorithm)


def test_the_algorithm_layer_imports_nothing_of_comm_job_persist_or_launchers():
    banned = ("diloco.comm", "diloco.job", "diloco.persist", "diloco.launchers")
    for module, targets in GRAPH.items():
        if module == "diloco" or module.startswith("diloco.algorithm"):
            assert not [t for t in targets if t.startswith(banned)], module


def test_persist_does_not_import_the_training_loop_or_launchers():
    for module, targets in GRAPH.items():
        if module.startswith("diloco.persist"):
            assert not [
                t for t in targets if t == "diloco.job.train" or t.startswith("diloco.launchers")
            ], module


@pytest.mark.parametrize("module", [m for m in sorted(MODULES) if m.startswith("diloco.config")])
def test_the_config_layer_does_not_import_torch(module):
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    assert "torch" not in roots


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_longer_than_500_lines(module):
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {lines} lines"


def test_there_is_one_home_for_benchmarks():
    assert not (ROOT / "bench").exists()
    assert (PACKAGE / "bench" / "__init__.py").is_file()
