"""Imports: no cycle in amed_core or flows (static graph), every module imports on its own in a fresh interpreter,
and amed_core imports nothing from flows or the orchestration stack."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("amed_core", "flows")
FORBIDDEN_IN_CORE = ("flows", "prefect", "ray", "mlflow", "fsspec", "s3fs")


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of every module ``name`` imports anywhere in its file (functions included, TYPE_CHECKING
    blocks not): for ``from X import y``, X and X.y when y is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    """Edges between our modules; importing a.b.c also runs the packages a.b and a (unless the importer is inside
    them, in which case they are already being imported)."""
    mods = {}
    for p in PACKAGES:
        mods.update(_modules(p))
    graph = {}
    for name, path in mods.items():
        deps = set()
        for imp in _imports(name, path):
            parts = imp.split(".")
            for k in range(1, len(parts) + 1):
                target = ".".join(parts[:k])
                if target in mods and target != name and not (name + ".").startswith(target + "."):
                    deps.add(target)
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_amed_core_imports_no_flows_or_orchestration():
    bad = []
    for name, path in _modules("amed_core").items():
        for imp in _imports(name, path):
            if imp.split(".")[0] in FORBIDDEN_IN_CORE:
                bad.append(f"{name} imports {imp}")
    assert not bad, bad


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_imports_on_its_own(package):
    """Each module first in a fresh interpreter (one subprocess per package, one child per module)."""
    names = sorted(_modules(package))
    code = ("import subprocess, sys\n"
            "bad = []\n"
            "for n in sys.argv[1:]:\n"
            "    r = subprocess.run([sys.executable, '-c', f'import {n}'], capture_output=True, text=True)\n"
            "    if r.returncode: bad.append(n + ': ' + r.stderr.strip().splitlines()[-1])\n"
            "print('\\n'.join(bad)); sys.exit(bool(bad))\n")
    r = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
