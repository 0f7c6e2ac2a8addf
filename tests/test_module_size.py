"""Modules stay small (the project guide: at most 400 lines a module), so that each one can be read whole."""

from __future__ import annotations

from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "distillistic"
LIMIT = 400


@pytest.mark.unit
def test_no_module_over_the_limit() -> None:
    sizes = {str(p.relative_to(PKG)): p.read_text().count("\n") for p in PKG.rglob("*.py")}
    assert len(sizes) > 50  # the package was found
    over = {name: n for name, n in sizes.items() if n > LIMIT}
    assert not over, f"modules over {LIMIT} lines: {over}"
