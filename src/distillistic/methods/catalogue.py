"""Every method's :class:`~distillistic.methods.spec.MethodSpec`, read without importing torch.

The built-in methods are the modules of this package; each assigns its spec(s) at module level. The catalogue
reads those assignments from the modules' source (``ast``) and evaluates them with the names of
:mod:`~distillistic.methods.spec` only, so that the config, the CLI and ``list algos`` know every method and
parameter in milliseconds. A method registered from the user's own module (:func:`add`, called by
:func:`distillistic.methods.registry.register_method`) joins the catalogue when that module is imported.
"""

from __future__ import annotations

import ast
import builtins
import functools
from pathlib import Path
from typing import Any

from distillistic.methods import spec as spec_mod
from distillistic.methods.spec import MethodSpec, Param

_HERE = Path(__file__).resolve().parent
_SKIP = {"__init__.py", "spec.py", "catalogue.py", "registry.py"}
_SAFE_BUILTINS = {name: getattr(builtins, name) for name in ("dict", "tuple", "float", "int", "str", "bool", "min",
                                                             "max", "range", "len", "frozenset")}
_added: dict[str, MethodSpec] = {}


def _module_specs(path: Path) -> list[MethodSpec]:
    """The :class:`MethodSpec` values a module assigns at top level (every assignment evaluable from specs)."""
    namespace: dict[str, Any] = {n: getattr(spec_mod, n) for n in dir(spec_mod) if not n.startswith("__")}
    namespace["__builtins__"] = _SAFE_BUILTINS
    found = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target, value = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            target, value = node.target.id, node.value
        else:
            continue
        try:  # an assignment that needs torch or the module's code is not a spec's: skip it
            result = eval(compile(ast.Expression(value), str(path), "eval"), namespace)
        except Exception:
            continue
        namespace[target] = result
        if isinstance(result, MethodSpec):
            found.append(result)
    return found


@functools.cache
def _builtin() -> dict[str, tuple[MethodSpec, str]]:
    out: dict[str, tuple[MethodSpec, str]] = {}
    for path in sorted(_HERE.glob("*.py")):
        if path.name in _SKIP:
            continue
        for spec in _module_specs(path):
            if spec.name in out:
                raise ValueError(f"method '{spec.name}' is defined twice (in {out[spec.name][1]} and {path.stem})")
            out[spec.name] = (spec, path.stem)
    return out


def builtin_module(name: str) -> str | None:
    """The module of this package that defines built-in method ``name`` (``None``: not a built-in)."""
    entry = _builtin().get(name)
    return f"distillistic.methods.{entry[1]}" if entry else None


def specs() -> dict[str, MethodSpec]:
    """Every method's spec, built-in and added, by name (sorted)."""
    merged = {name: entry[0] for name, entry in _builtin().items()} | _added
    return dict(sorted(merged.items()))


def add(spec: MethodSpec) -> None:
    """Add a method registered from outside this package; its parameters become config keys."""
    if spec.name in _builtin() and _builtin()[spec.name][0] is not spec:
        raise ValueError(f"method '{spec.name}' is a built-in method; choose another name")
    if spec.name in _added and _added[spec.name] != spec:
        raise ValueError(f"method '{spec.name}' is already registered")
    taken = params()
    for p in spec.params:
        if p.name in taken and taken[p.name] != p:
            raise ValueError(f"method {spec.name}: parameter '{p.name}' is already another method's; rename it")
    _added[spec.name] = spec


def params() -> dict[str, Param]:
    """Every method's parameters by config key (a shared parameter, such as logit_standardize, once)."""
    out: dict[str, Param] = {}
    for spec in specs().values():
        for p in spec.params:
            out.setdefault(p.name, p)
    return out


def builtin_params() -> dict[str, Param]:
    """The built-in methods' parameters by config key: the config's generated fields."""
    out: dict[str, Param] = {}
    for spec, _module in _builtin().values():
        for p in spec.params:
            out.setdefault(p.name, p)
    return out


def derived_keys() -> dict[str, str]:
    """Keys a run derives from another run when their source key is set (key -> source key): its config.yaml
    holds the derived value, a sweep's plan the unset one (the run derives it again when resumed)."""
    return {k: p.derived_from for k, p in params().items() if p.derived_from is not None}


def owners(key: str) -> list[str]:
    """The methods that read config key ``key`` (their own parameter or a common key they use)."""
    return [name for name, spec in specs().items() if key in spec.keys_read()]
