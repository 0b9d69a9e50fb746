"""The layer order of ARCHITECTURE.md, checked from the code's own imports (no GPU needed).

Every module under ``nexusrt/`` imports (the GPU-only ones too, so a broken import path is
caught here), no module imports a layer above its own, and no modules import each other in
a circle. Imports inside functions count: they run too. Both runners implement the protocol.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import nexusrt

ROOT = Path(nexusrt.__file__).parent

# Bottom up, as ARCHITECTURE.md lists them: a module may import its own layer and those below.
LAYERS = ["errors", "runtime", "reference", "driver", "memory", "kvcache", "kernels", "firmware",
          "scheduler", "models", "parallel", "backends", "serving", "engine", "nexusrt", "server", "cli", "bench"]


def _modules() -> list[str]:
    return ["nexusrt"] + sorted(m.name for m in pkgutil.walk_packages(nexusrt.__path__, "nexusrt."))


def _path(module: str) -> Path:
    rel = Path(*module.split(".")[1:])
    pkg = ROOT / rel / "__init__.py"
    return pkg if pkg.exists() else ROOT / rel.with_suffix(".py")


def _is_module(name: str) -> bool:
    return name == "nexusrt" or (name.startswith("nexusrt.") and _path(name).exists())


def _imports(module: str) -> set[str]:
    """The nexusrt modules ``module`` imports, anywhere in its file."""
    path = _path(module)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "nexusrt")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "nexusrt":
                continue
            for a in node.names:  # `from pkg import sub` imports the submodule
                found.add(f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base)
    return {m for m in found if _is_module(m)}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1] if len(parts) > 1 else "nexusrt")


MODULES = _modules()


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports_without_a_gpu(module):
    importlib.import_module(module)


def test_no_import_runs_up_the_layers():
    upward = [f"{m} -> {t}" for m in MODULES for t in sorted(_imports(m)) if _layer(t) > _layer(m)]
    assert upward == [], "imports that run up the layers of ARCHITECTURE.md:\n" + "\n".join(upward)


def test_no_import_circles():
    # A package's __init__ that hands on names of its own submodules is its face, not a circle.
    graph = {m: {t for t in _imports(m) if not m.startswith(t + ".")} for m in MODULES}
    state, circles = {}, []

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                circles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = "done"

    for m in MODULES:
        if m not in state:
            visit(m, [])
    assert circles == [], "modules that import each other in a circle:\n" + "\n".join(circles)


def test_both_runners_implement_the_runner_protocol():
    from nexusrt.backends.base import ModelRunner
    from nexusrt.backends.cpu.model import CpuRunner
    from nexusrt.backends.cuda.runner import CudaRunner

    methods = [n for n, v in vars(ModelRunner).items() if callable(v) and not n.startswith("_")]
    assert "generate_tokens" in methods
    for runner in (CpuRunner, CudaRunner):
        missing = [n for n in methods if not callable(getattr(runner, n, None))]
        assert missing == [], f"{runner.__name__} lacks {missing}"


def test_imports_inside_functions_resolve():
    """Deferred imports (inside functions) run only on the paths that reach them, often GPU-only
    ones: every ``from nexusrt... import name`` anywhere in the package must name something real."""
    import ast
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    bad = []
    for path in sorted((root / "nexusrt").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = package[:len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            if not name or not name.startswith("nexusrt"):
                continue
            try:
                module = importlib.import_module(name)
            except ImportError as exc:
                bad.append(f"{path.relative_to(root)}: {name} ({exc})")
                continue
            for alias in node.names:
                if alias.name == "*" or hasattr(module, alias.name):
                    continue
                try:
                    importlib.import_module(f"{name}.{alias.name}")
                except ImportError:
                    bad.append(f"{path.relative_to(root)}: {name} has no {alias.name}")
    assert not bad, "\n".join(bad)
