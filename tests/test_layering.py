"""The packages depend one way (README, "Code layout").

    study      the model vocabulary and the study file: imports nothing of ours above it
    workers    finite models, ensembles, training: imports study
    analysis   kernels, predictions, comparison, report: imports study
    eqntk      command line, runner, store, pipelines: imports all three

These tests read the source (every import statement, at module level or inside a function)
and fail on an upward or sideways edge between packages, on a cycle between modules, and on
an import inside a function that is not the deferral of a heavy optional dependency with its
reason on the line above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYER = {"study": 0, "workers": 1, "analysis": 1, "eqntk": 2}
# Imports a function may defer: each costs seconds or is an optional extra that most runs never load.
DEFERRABLE = ("escnn", "pyscf", "threadpoolctl", "study.escnn_types")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in LAYER:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


MODULES = _modules()


def _imports(mod: str, path: Path):
    """``(target module, line, inside a function)`` for each import of ``mod``."""
    tree = ast.parse(path.read_text())
    in_function = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import module`` names a module; ``from module import name`` does not
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            yield t, node.lineno, id(node) in in_function


def _ours(target: str) -> str | None:
    """The module of ours that ``target`` names (its longest known prefix), else None."""
    parts = target.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in MODULES:
            return ".".join(parts[:k])
    return None


EDGES = [(mod, _ours(t), line, inner) for mod, path in MODULES.items() for t, line, inner in _imports(mod, path)]


def test_the_walker_sees_the_packages():
    # a walker that found nothing would pass every check below
    assert {"study.spec", "workers.models", "analysis.kernels", "eqntk.cli"} <= set(MODULES)
    assert ("eqntk.kinds.ensemble", "eqntk.pipeline") in {(a, b) for a, b, _, _ in EDGES}
    assert ("workers.models", "study.spec") in {(a, b) for a, b, _, _ in EDGES}


def test_no_upward_or_sideways_import():
    bad = []
    for mod, target, line, _ in EDGES:
        if target is None:
            continue
        src, dst = mod.split(".")[0], target.split(".")[0]
        if src != dst and LAYER[dst] >= LAYER[src]:
            bad.append(f"{MODULES[mod].relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycle_between_modules():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, target, _, _ in EDGES:
        if target is not None and target != mod and not target.startswith(mod + "."):
            graph[mod].add(target)
    # a package's __init__ importing its own modules is not a cycle through them
    for m in MODULES:
        graph[m] = {t for t in graph[m] if not (m.count(".") == 0 and t.startswith(m + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_inside_functions_only_defer_heavy_optional_dependencies():
    bad = []
    for mod, path in MODULES.items():
        lines = path.read_text().splitlines()
        for target, line, inner in _imports(mod, path):
            if not inner:
                continue
            # the reason stands in a comment just above (a few lines: a try: or a sibling import between)
            reason = any(l.strip().startswith("# deferred:") for l in lines[max(0, line - 5) : line - 1])
            if not (target.startswith(DEFERRABLE) and reason):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
    assert not bad, "\n".join(bad)
