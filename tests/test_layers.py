"""The package's layers: imports flow one way (DESIGN.md, section 7), and no module closes a cycle.

    base (errors, registry, fileio, imports, the methods' specs) <- config <- core <- data, models, methods
    <- training (the loop) <- runs <- teachers <- training's assembly (run, generations, calibrate), deploy
    (exports, benchmarks, predictions) <- experiments <- cli

``training/`` is one room in two floors: the loop (engine, runtime, optim, checkpoint, ...) under the run
outputs (``runs/``) and the teachers (``teachers/``), and the assembly of a run above both.

Every ``import`` and ``from ... import`` of every module is read with :mod:`ast` (also the ones inside
functions, which is where a cycle usually hides), so a lazy import that goes up a layer fails here too.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "distillistic"
LAYERS = {"errors": 0, "registry": 0, "fileio": 0, "imports": 0, "locks": 0, "config": 1, "core": 2, "data": 3,
          "models": 3, "methods": 3, "training": 4, "runs": 5, "teachers": 6, "deploy": 7, "experiments": 8, "names": 8,
          "cli": 9, "__main__": 10, "__init__": 10}
# Modules whose layer is not their package's: the assembly of a run, above the teachers and run outputs.
MODULE_LAYERS = {"training.run": 7, "training.generations": 7, "training.calibrate": 7,
                 # the methods' specs are plain data that the config reads: below it (no torch, no core)
                 "methods": 0, "methods.spec": 0, "methods.catalogue": 0}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 2 else parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    if ".".join(parts[1:3]) in MODULE_LAYERS:
        return MODULE_LAYERS[".".join(parts[1:3])]
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


def _imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports (absolute names)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distillistic"):
            modules = {f"{node.module}.{a.name}" for a in node.names}  # "from distillistic.training import setup"
            modules = {m for m in modules if (PKG.parent / (m.replace(".", "/") + ".py")).is_file()
                       or (PKG.parent / m.replace(".", "/") / "__init__.py").is_file()}
            found |= modules or {node.module}
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; use absolute 'distillistic.' imports")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("distillistic")}
    return found


@functools.cache
def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


@pytest.mark.parametrize("module", sorted(_graph()))
def test_imports_flow_down(module: str) -> None:
    """A module imports only lower layers, or its own sub-package (data and models are siblings: neither
    imports the other; the base modules may import each other)."""
    mine = _layer(module)
    for target in _graph()[module]:
        assert target != "distillistic" or module == "distillistic.__main__", f"{module} imports the package root"
        same_floor = target.split(".")[:2] == module.split(".")[:2] and _layer(target) == mine
        assert _layer(target) < mine or same_floor or _layer(target) == mine == 0, \
            f"{module} (layer {mine}) imports {target} (layer {_layer(target)}): imports must flow down"


def test_no_cycles() -> None:
    graph = {m: {t for t in targets if t in _graph()} for m, targets in _graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt):], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_checker_sees_a_bad_import(tmp_path: Path) -> None:
    """The reader finds imports inside functions: a lazy upward import is not hidden from it."""
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from distillistic.training.run import train\n    return train\n")
    assert _imports(bad) == {"distillistic.training.run"}
