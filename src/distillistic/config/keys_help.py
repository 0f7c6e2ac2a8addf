"""Each config key's help line and ``--help`` group, from the fields' metadata and the methods' specs."""

from __future__ import annotations

from typing import Any

from distillistic.config.schema import FIELDS
from distillistic.methods import catalogue


def _names(filter_: Any) -> str:
    return ", ".join(name for name, spec in catalogue.specs().items() if filter_(spec))


def _placeholders() -> dict[str, str]:
    specs = catalogue.specs()
    sizes = ", ".join(f"{n} {s.default_students}" for n, s in specs.items() if s.default_students > 1)
    return {"methods": ", ".join(specs), "cohort": _names(lambda s: s.family == "cohort"),
            "sum_methods": _names(lambda s: s.composition == "sum"), "cohort_sizes": sizes}


def help_text(key: str) -> str:
    """The help line of config key ``key`` (its placeholders filled from the methods' specs)."""
    if key in FIELDS:
        text = str(FIELDS[key].metadata.get("help", ""))
        return text.format(**_placeholders()) if "{" in text else text
    param = catalogue.params()[key]
    return f"{', '.join(catalogue.owners(key))}: {param.help}"


def groups() -> dict[str, list[str]]:
    """Config keys by ``--help`` group, in the order they are declared; method parameters last, by method."""
    out: dict[str, list[str]] = {}
    for name, f in FIELDS.items():
        if "param" not in f.metadata:
            out.setdefault(str(f.metadata.get("group", "other settings")), []).append(name)
    seen: set[str] = set()
    for method, spec in catalogue.specs().items():
        keys = [p.name for p in spec.params if p.name not in seen]
        if keys:
            out[f"{method} parameters"] = keys
            seen.update(keys)
    return out
