"""The import graph of recon/ and scores/, read from the source with ``ast``: no cycle, no import up a layer.

Edges counted: every ``import`` / ``from ... import`` statement of a module, wherever it stands — at module
level, inside a function or method, under ``if TYPE_CHECKING:`` or in a ``try:`` — resolved to the
deepest module of recon/ or scores/ it names (``from recon.data.sample import Sample`` → ``recon.data.sample``;
``from recon.data import Sample`` → the package ``recon.data``, i.e. its ``__init__``; relative imports
resolved against the importing module's package). Not counted: Python's implicit import of a module's parent
packages (``recon.data.sample`` running ``recon/data/__init__.py`` first), which would make every package
that re-exports its submodules a cycle of its own; imports of anything outside recon/ and scores/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("recon", "scores")

# recon's layers, bottom up (recon/__init__.py): a module imports from its own layer or below, never above.
RECON_LAYERS: tuple[tuple[str, ...], ...] = (
    ("recon.errors", "recon.atomic", "recon.resources", "recon.fft"),
    ("recon.operators", "recon.masks", "recon.coils", "recon.dc", "recon.sure", "recon.metrics"),
    ("recon.data",),  # the package, every reader/writer/simulator module under it, and data.transforms
    ("recon.adapt", "recon.baselines", "recon.biasrecon"),
    ("recon.methods", "recon.config"),
    ("recon.runner", "recon.jobs", "recon.figures", "recon.openworld", "recon.bench", "recon.speed_quality"),
)


def modules() -> dict[str, tuple[Path, bool]]:
    """Every module of recon/ and scores/: dotted name → (file, is a package ``__init__``)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _resolve(name: str, known: dict) -> str | None:
    """The deepest known module that ``name`` lies in (``recon.data.sample.Sample`` → ``recon.data.sample``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module → the modules of recon/ and scores/ it imports (see the module docstring for what counts)."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, (path, is_package) in known.items():
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{alias.name}" for alias in node.names]  # a submodule, or a name in source
            for target in targets:
                resolved = _resolve(target, known)
                if resolved is not None and resolved != name:
                    graph[name].add(resolved)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _layer(module: str) -> int:
    for rank, layer in enumerate(RECON_LAYERS):
        if any(module == m or module.startswith(m + ".") for m in layer):
            return rank
    raise AssertionError(f"{module} is in no layer of RECON_LAYERS: add it to the layer it belongs to")


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_graph_sees_module_level_function_level_and_type_checking_imports():
    graph = import_graph()
    assert "recon.coils" in graph["recon.data.normalize"]  # module level: rss
    assert "recon.data.anatomy" in graph["recon.data.images"]  # inside a function only
    assert {"recon.data.sample", "recon.masks"} <= graph["recon.data.fastmri_io"]
    assert "scores.networks.unet" in graph["scores.model"]
    assert all(not m.startswith("scores") for m in graph["recon.runner"])


def test_recon_and_scores_import_graph_has_no_cycle():
    graph = import_graph()
    found = cycles(graph)
    described = ["; ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in found]
    assert not found, "import cycles among the modules of recon/ and scores/: " + " | ".join(described)


@pytest.mark.parametrize("package,other", [("recon", "scores"), ("scores", "recon")])
def test_recon_and_scores_never_import_each_other(package, other):
    graph = import_graph()
    crossing = {m: sorted(t for t in ts if t.split(".")[0] == other)
                for m, ts in graph.items() if m.split(".")[0] == package}
    assert not {m: ts for m, ts in crossing.items() if ts}


def test_no_recon_module_imports_a_layer_above_its_own():
    graph = import_graph()
    upward = [f"{m} -> {t}" for m, ts in sorted(graph.items()) if m.startswith("recon.")
              for t in sorted(ts) if t.startswith("recon.") and _layer(t) > _layer(m)]
    assert not upward, "imports running up recon's layers: " + ", ".join(upward)
