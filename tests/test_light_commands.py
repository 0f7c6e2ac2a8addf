"""Light subcommands stay light: 'list', 'list algos' and '--version' import no torch, and the names they print
(names.json) are the registries' own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distillistic import names

ROOT = Path(__file__).resolve().parents[1]


def test_names_json_is_the_registries() -> None:
    """names.json falls out of step when a method, dataset, model or divergence is added: regenerate it with
    'python -m distillistic.names'."""
    assert names.shipped() == names.live()


@pytest.mark.parametrize("argv", [["list"], ["list", "algos"], ["list", "datasets"], ["--version"]])
def test_light_commands_import_no_torch(argv: list[str]) -> None:
    code = ("import sys, runpy\nsys.argv = ['distillistic', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('distillistic', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nprint('torch loaded' if 'torch' in sys.modules else 'no torch')")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, text=True, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "no torch"
    if argv == ["list"]:
        assert "datasets: " in done.stdout
        assert "mnist-t10k" in done.stdout
    if argv == ["list", "algos"]:
        assert "Hinton" in done.stdout
