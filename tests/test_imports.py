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


def _imports(name: str, path: Path, attrs_from: set[str] | None = None, modules=()) -> set[str]:
    """Absolute names of every module ``name`` imports anywhere in its file (functions included, TYPE_CHECKING
    blocks not): for ``from X import y``, X and X.y when y is a module. With ``attrs_from`` (a set), the X of every
    ``from X import y`` whose X.y is not in ``modules`` is also added to it: that import needs X's ``__init__`` to
    have run to its end, even when X is the importer's own package."""
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
            if attrs_from is not None and any(f"{mod}.{a.name}" not in modules for a in node.names):
                attrs_from.add(mod)
    return out


def _graph() -> dict[str, set[str]]:
    """Edges between our modules; importing a.b.c also runs the packages a.b and a (unless the importer is inside
    them, in which case they are already being imported). A name taken from one's own package (``from
    amed_core.methods import solve`` inside amed_core.methods.gits) is an edge too: it needs the package's
    ``__init__`` finished, which is how a function-level import cycle through amed_core.methods went unseen."""
    mods = {}
    for p in PACKAGES:
        mods.update(_modules(p))
    graph = {}
    for name, path in mods.items():
        deps, attrs_from = set(), set()
        for imp in _imports(name, path, attrs_from, mods):
            parts = imp.split(".")
            for k in range(1, len(parts) + 1):
                target = ".".join(parts[:k])
                if target in mods and target != name and not (name + ".").startswith(target + "."):
                    deps.add(target)
        deps.update(m for m in attrs_from if m in mods and m != name)
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


_TWO_THREADS = """
import sys, threading
{preload}
errors = []
def imp(name):
    try:
        __import__(name)
    except BaseException as e:
        errors.append(f"{{name}}: {{e!r}}")
t = threading.Thread(target=imp, args=("pydantic.v1",))  # what Prefect imports validating a flow's parameters
t.start()
imp("pydantic.v1.fields")  # what Ray imports at its first task submission
t.join()
print("\\n".join(errors)); sys.exit(bool(errors))
"""


def test_thread_unsafe_imports_are_imported_before_threads_start():
    """`amed distill` starts a Prefect warm-up thread while its main thread submits Ray tasks: Prefect imports
    ``pydantic.v1`` and Ray ``pydantic.v1.fields``, and on Python 3.11 those two at once fail (a CI run failed so).
    Here the same two imports on two threads of a fresh interpreter, after flows.env.import_thread_unsafe_modules
    (which ray_session and the CLI call before any second thread), three times. Without the preload it failed 60 of 60
    times on this machine."""
    if sys.version_info >= (3, 14):
        pytest.skip("Pydantic has no v1 package on Python 3.14+")
    preload = "from flows.env import import_thread_unsafe_modules; import_thread_unsafe_modules()"
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", _TWO_THREADS.format(preload=preload)], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr


def test_ray_session_and_the_cli_preload_before_their_threads():
    """The two places that start a second thread next to Ray submissions call the preload first (source order)."""
    session = (ROOT / "flows/cluster/session.py").read_text()
    assert session.index("import_thread_unsafe_modules()") < session.index("ray.init(")
    cli = (ROOT / "flows/commands/distill.py").read_text()
    assert cli.index("import_thread_unsafe_modules()") < cli.index("warm.start()")
