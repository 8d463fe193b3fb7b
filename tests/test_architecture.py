"""The layers of moe2lib (docs/architecture.md): which package may import which, no import cycles, and no
private name imported across modules. Imports inside functions count: a cycle closed lazily is a cycle.

The checks read the source (ast), so they also run on a copy of the library with a planted fault, which
proves that each of them can fail.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "moe2lib"

# Rank of each package: a module may import its own package and packages of a lower rank only.
# analysis and serve share a rank and may not import each other.
RANK = {"errors": 0, "infra": 1, "core": 2, "data": 3, "models": 4, "analysis": 5, "serve": 5, "pipeline": 6,
        "": 7}  # "": moe2lib/__init__.py and __main__.py


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under ``root`` (a package named like root)."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports(root: Path) -> list[tuple[str, str, str, int]]:
    """(importer, imported module, imported name or '', line) for every moe2lib import, at any depth."""
    mods = module_files(root)
    top = root.name
    out = []
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out += [(name, a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == top]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    base = ".".join(filter(None, [base, node.module]))
                else:
                    base = node.module or ""
                if base.split(".")[0] != top:
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    out.append((name, sub, "", node.lineno) if sub in mods else (name, base, a.name, node.lineno))
    return out


def package_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return ""
    return parts[1]


def layer_violations(root: Path) -> list[str]:
    out = []
    for src, dst, _, line in imports(root):
        a, b = package_of(src), package_of(dst)
        if a == b:
            continue
        if b not in RANK or a not in RANK:
            out.append(f"{src}:{line} imports {dst}: package {b or a!r} has no layer in RANK")
        elif RANK[b] >= RANK[a]:
            out.append(f"{src}:{line} imports {dst} ({a or 'moe2lib'} may not import {b})")
    return out


def private_imports(root: Path) -> list[str]:
    """A name starting with '_' imported from another module (dunder names such as __version__ aside)."""
    return [f"{src}:{line} imports the private name {dst}.{nm}" for src, dst, nm, line in imports(root)
            if nm.startswith("_") and not nm.startswith("__") and dst != src]


def cycles(root: Path) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself), Tarjan."""
    graph: dict[str, set[str]] = {m: set() for m in module_files(root)}
    for src, dst, _, _ in imports(root):
        if dst in graph:
            graph[src].add(dst)
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_package_has_a_layer_and_the_arrows_point_down():
    packages = {package_of(m) for m in module_files(ROOT)}
    assert packages <= set(RANK), packages - set(RANK)
    assert layer_violations(ROOT) == []


def test_no_import_cycles():
    assert cycles(ROOT) == []


def test_no_private_name_imported_across_modules():
    assert private_imports(ROOT) == []


def test_the_graph_is_read():
    """The checks see real imports (a reader that finds nothing would pass them all)."""
    edges = {(s, d) for s, d, _, _ in imports(ROOT)}
    assert ("moe2lib.analysis.evaluation", "moe2lib.core.gating") in edges
    assert ("moe2lib.models.scoring", "moe2lib.core.scores") in edges
    assert len(edges) > 100


@pytest.fixture
def planted(tmp_path):
    copy = tmp_path / "moe2lib"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _append(path: Path, text: str):
    path.write_text(path.read_text() + "\n" + text + "\n")


def test_a_planted_cycle_is_found(planted):
    # core.smo -> core.fusion -> core.smo, the second arrow inside a function
    _append(planted / "core" / "smo.py", "from . import fusion  # planted")
    _append(planted / "core" / "fusion.py", "def _planted():\n    from .smo import select_subset\n    return select_subset")
    assert ["moe2lib.core.fusion", "moe2lib.core.smo"] in cycles(planted)
    assert cycles(ROOT) == []


def test_a_planted_upward_import_is_found(planted):
    _append(planted / "core" / "smo.py", "def _planted():\n    from ..models import scoring\n    return scoring")
    found = layer_violations(planted)
    assert len(found) == 1 and "moe2lib.core.smo" in found[0] and "core may not import models" in found[0]


def test_a_planted_private_import_is_found(planted):
    _append(planted / "analysis" / "tables.py", "from ..core.gating import _as_mask  # planted")
    found = private_imports(planted)
    assert found and "moe2lib.core.gating._as_mask" in found[0]
