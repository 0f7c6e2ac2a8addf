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

    # a model or dataset named module:function is a plugin registered at run time, not a built-in name
    def builtin(names: list[str]) -> list[str]:
        return [n for n in names if ":" not in n]

    return {"datasets": builtin(DATASETS.names()), "models": builtin(MODELS.names()),
            "divergences": list(DIVERGENCES.names())}


def shipped() -> dict[str, Any]:
    """The names as ``names.json`` records them (no torch)."""
    return dict(json.loads(FILE.read_text()))


def write() -> None:
    """Rewrite ``names.json`` from the registries."""
    FILE.write_text(json.dumps(live(), indent=1, ensure_ascii=False) + "\n")


def default_text(value: Any) -> str:
    """A default as ``--help`` and ``list algos`` show it: unset, on/off, a list, a number to 4 digits."""
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "unset" if value is None else str(value)


def print_list(what: str | None, num_classes: int | None = None, family: str | None = None) -> None:
    """``distillistic list [what]``: the registries' names; ``algos`` with each method's paper, formula and
    parameters (from the specs); ``models --num-classes K`` with each model's parameter count."""
    from distillistic.methods import catalogue

    if what == "algos":
        for name, spec in catalogue.specs().items():
            print(f"{name:10s} {spec.family:10s} {spec.reference}\n{'':21s}{spec.formula}")
            for p in spec.params:
                default = default_text(p.default)
                cite = f" [{p.cite}]" if p.cite else ""
                print(f"{'':21s}--{p.name.replace('_', '-')} {default}: {p.help}{cite}")
        return
    if what == "models" and (num_classes is not None or family is not None):
        from distillistic.models.listing import model_table

        print("\n".join(model_table(num_classes or 1000, family)))
        return
    names = shipped()
    for kind in ("algos", "datasets", "models", "divergences"):
        if what in (None, kind):
            shown = list(catalogue.specs()) if kind == "algos" else names[kind]
            print(f"{kind}: {', '.join(shown)}")


if __name__ == "__main__":
    write()
