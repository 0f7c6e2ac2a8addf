"""Functions stay short (the project guide: at most 60 lines a function, its docstring included), so that each
one can be read at a glance; beside :mod:`test_module_size`, which bounds the modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "distillistic"
LIMIT = 60


def function_lengths(source: str) -> dict[str, int]:
    """``qualified name -> lines`` from its ``def`` line to its last line, for every function and method (nested
    ones too, each counted on its own as well as inside its parent)."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                assert child.end_lineno is not None
                lengths[f"{name}:{child.lineno}"] = child.end_lineno - child.lineno + 1
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return lengths


@pytest.mark.unit
def test_the_counter_counts_def_to_last_line() -> None:
    source = "def f():\n    x = 1\n\n    return x\n\n\nclass C:\n    def m(self):\n        def inner():\n" \
             "            pass\n        return inner\n"
    assert function_lengths(source) == {"f:1": 4, "C.m:8": 4, "C.m.inner:9": 2}


@pytest.mark.unit
def test_no_function_over_the_limit() -> None:
    lengths = {f"{p.relative_to(PKG)}:{name}": n for p in PKG.rglob("*.py")
               for name, n in function_lengths(p.read_text()).items()}
    assert len(lengths) > 500  # the package's functions were found
    over = {name: n for name, n in lengths.items() if n > LIMIT}
    assert not over, f"functions over {LIMIT} lines: {over}"
