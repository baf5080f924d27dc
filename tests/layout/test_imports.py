"""The package's shape: every module imports on its own, imports go one way, the client needs no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("worker", "training")


def modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__main__":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join(parts))
    return names


def imports_of(path: Path, module: str) -> set[str]:
    """Project modules named by the import statements of one file (top level and inside functions)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).strip(".")
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    known = set(modules())
    return {name for name in found if name in known}


def test_every_module_imports_on_its_own() -> None:
    """Each project module is imported first thing in a fresh process: an import cycle shows up there as
    'partially initialized module'. The processes fork from one that holds only third-party libraries (torch,
    celery, ...), as many at a time as there are cores, so no project module is loaded before the one under
    test and the check stays cheap."""
    code = (
        "import gc, importlib, os, sys, traceback\n"
        "for lib in ('torch', 'torchvision', 'timm', 'celery', 'kombu', 'fastapi', 'pandas', 'sklearn',\n"
        "            'matplotlib', 'boto3', 'PIL', 'typer', 'rich', 'pydantic_settings', 'redis',\n"
        "            'structlog'):\n"
        "    importlib.import_module(lib)\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('worker', 'training')]\n"
        "gc.freeze()  # the children's collections skip the preloaded heap, which then stays shared\n"
        "bad, running, names = [], {}, sys.argv[1:]\n"
        "while names or running:\n"
        "    while names and len(running) < (os.cpu_count() or 1):\n"
        "        name = names.pop(0)\n"
        "        r, w = os.pipe()\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            os.close(r)\n"
        "            try:\n"
        "                importlib.import_module(name)\n"
        "                os._exit(0)\n"
        "            except BaseException:\n"
        "                os.write(w, traceback.format_exc().strip().splitlines()[-1].encode()[:500])\n"
        "                os._exit(1)\n"
        "        os.close(w)\n"
        "        running[pid] = (name, r)\n"
        "    pid, status = os.wait()\n"
        "    name, r = running.pop(pid)\n"
        "    message = os.read(r, 1000).decode()\n"
        "    os.close(r)\n"
        "    if status:\n"
        "        bad.append(f'{name}: {message}')\n"
        "print('\\n'.join(sorted(bad)))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *modules()], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_graph_has_no_cycle_and_worker_never_imports_training() -> None:
    graph: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join(parts)
            graph[name] = {m for m in imports_of(path, name) if m != name and not name.startswith(m + ".")}
    offenders = sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        if m.startswith("worker")
        for d in deps
        if d.startswith("training")
    )
    assert not offenders, offenders

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def heavy_modules_loaded(imports: str, heavy: tuple[str, ...]) -> list[str]:
    """Which of ``heavy`` a fresh interpreter holds after running ``imports``."""
    code = f"import sys\n{imports}\nprint(','.join(sorted(m for m in {heavy!r} if m in sys.modules)))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return [m for m in result.stdout.strip().split(",") if m]


def test_client_api_needs_no_torch() -> None:
    loaded = heavy_modules_loaded(
        "from worker import Producer\nfrom worker.records import Decision, Event",
        ("torch", "torchvision", "timm", "celery", "PIL", "numpy"),
    )
    assert loaded == [], f"the client API imported {','.join(loaded)}"


def test_cli_start_up_needs_no_training_stack() -> None:
    """Every ``moderation`` command builds the whole command tree first; torch, scipy and timm load only
    inside the commands that use them (a lighter start for the review server, the API and the shell)."""
    loaded = heavy_modules_loaded(
        "import worker.cli.main", ("torch", "torchvision", "timm", "scipy", "sklearn", "pandas")
    )
    assert loaded == [], f"the CLI imported {','.join(loaded)} at start-up"
