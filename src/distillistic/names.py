"""The registered names that ``distillistic list`` prints, without importing torch.

``names.json`` beside this module holds the dataset, model and divergence registries' names (the methods' come
from their specs, :mod:`distillistic.methods.catalogue`); ``tests/test_light_commands.py`` fails when it falls
out of step, and ``python -m distillistic.names`` rewrites it. Plugins (``--model pkg:fn``) register at run
time and are not in it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FILE = Path(__file__).resolve().parent / "names.json"


def live() -> dict[str, Any]:
    """The names from the registries themselves (imports torch and torchvision)."""
    from distillistic.core.divergences import DIVERGENCES
    from distillistic.data.loader import DATASETS
    from distillistic.models.builders import MODELS

    return {"datasets": list(DATASETS.names()), "models": list(MODELS.names()),
            "divergences": list(DIVERGENCES.names())}


def shipped() -> dict[str, Any]:
    """The names as ``names.json`` records them (no torch)."""
    return dict(json.loads(FILE.read_text()))


def write() -> None:
    """Rewrite ``names.json`` from the registries."""
    FILE.write_text(json.dumps(live(), indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write()
