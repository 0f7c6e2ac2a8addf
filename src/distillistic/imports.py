"""Import a user's module by name or by ``.py`` file, with one clear error line (no torch here)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from distillistic.errors import UserError, short_repr


def import_module_or_file(module: str, what: str) -> Any:
    """Import a module name or a ``.py`` file; the current folder is searched too."""
    try:
        if module.endswith(".py"):
            path = Path(module).expanduser().resolve()
            if not path.is_file():
                raise UserError(f"{what}: file {short_repr(module)} does not exist")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            if spec is None or spec.loader is None:
                raise UserError(f"{what}: '{module}' cannot be imported as a Python file")
            loaded = sys.modules.get(path.stem)
            if loaded is not None and getattr(loaded, "__file__", None) == str(path):
                return loaded
            mod = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = mod
            spec.loader.exec_module(mod)
            return mod
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())  # as 'python -m' does: a module beside the config is found
        return importlib.import_module(module)
    except UserError:
        raise
    except ImportError as e:
        raise UserError(f"{what}: cannot import {short_repr(module)} ({e}); check the name and that it is on "
                        "PYTHONPATH or in the current folder") from None
    except Exception as e:  # the user's module raised while it was imported
        raise UserError(f"{what}: importing {short_repr(module)} failed ({type(e).__name__}: {e})") from None


def installed_version(distribution: str = "distillistic") -> str:
    """The installed version of ``distribution`` (its package metadata), or a note that it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown (not installed)"
