"""Values from YAML, flags and ``--set`` converted to each config key's type; configs loaded and saved."""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from distillistic.config.schema import FIELDS, Config, all_keys, param_of
from distillistic.config.validate import CHOICES, split_names, validate
from distillistic.config.yaml_files import read_yaml, safe_load_bounded
from distillistic.errors import ConfigError, UserError, short_repr
from distillistic.imports import import_module_or_file
from distillistic.methods.spec import Param

INT_LIMIT = 2**63  # every whole number must fit a signed 64-bit integer (torch seeds, tensor sizes)
_HINTS: dict[str, Any] = typing.get_type_hints(Config)


def _unknown_key(key: str) -> UserError:
    close = difflib.get_close_matches(key, all_keys(), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"unknown config key {short_repr(key)}{hint}; see 'distillistic train --help' for the keys")


def coerce(key: str, value: Any) -> Any:
    """Convert a YAML/``--set`` value to the type of config key ``key`` or raise :class:`ConfigError`."""
    param = param_of(key)
    if param is not None:  # a method's parameter: its spec's type and range
        return _coerce_param(key, value, param)
    if key not in FIELDS:
        raise _unknown_key(key)
    if key == "teacher_weights" and isinstance(value, str):
        # Kept whole: one teacher's path may hold a comma, several teachers' entries are comma-separated; the
        # config, which knows the teachers, tells them apart (Config.__post_init__).
        return value
    return _coerce_to(key, value, _HINTS[key])


def _coerce_param(key: str, value: Any, param: Param) -> Any:
    hint: Any = tuple[str, ...] if param.type is tuple else param.type
    coerced = _coerce_to(key, value, hint | None if param.optional else hint)
    problem = param.check(coerced)
    if problem is not None:
        raise ConfigError(key, coerced, problem)
    return coerced


def _coerce_to(key: str, value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        # "none" is a value of its own where it is a valid choice (--augment none), not "unset".
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")
                                    and value not in CHOICES.get(key, ()))
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:
            return _coerce_union(key, value, inner)
        return _coerce_to(key, value, inner[0])
    if origin is tuple:
        items = value if isinstance(value, list | tuple) else _split_list(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce_to(key, v, args[0]) for v in items)
        if len(items) != len(args):
            raise ConfigError(key, value, f"a list of {len(args)} values")
        return tuple(_coerce_to(key, v, a) for v, a in zip(items, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(key, value, "true or false")
    if hint is int:
        return _whole(key, value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(key, value, "a number")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(key, value, "a number") from None
        except OverflowError:  # an int beyond float range
            raise ConfigError(key, value, "a finite number") from None
        if not math.isfinite(number):
            raise ConfigError(key, value, "a finite number")
        return number
    if hint is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, value, "a string")
    raise TypeError(f"config key {key} has an unsupported type {hint}")


def _coerce_union(key: str, value: Any, hints: list[Any]) -> Any:
    """The first of ``hints`` that accepts ``value`` (``students``: a count, else a list of architectures).

    A number (or a string that reads as one) is only ever a count, so ``students: 2.5`` is refused as
    a count rather than taken as a model named "2.5".
    """
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(value, str):
        try:
            float(value)
            numeric = True
        except ValueError:
            pass
    if numeric and int in hints:
        return _coerce_to(key, value, int)
    for hint in hints:
        try:
            return _coerce_to(key, value, hint)
        except ConfigError:
            continue
    raise ConfigError(key, value, " or ".join(_describe(h) for h in hints))


def _describe(hint: Any) -> str:
    if hint is int:
        return "a whole number"
    if typing.get_origin(hint) is tuple:
        return "a list of names"
    return getattr(hint, "__name__", str(hint))


def _whole(key: str, value: Any) -> int:
    """An int from an int, an integral float (``1e3``) or a string of either; within +-2**63."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(key, value, "a whole number")
    number: int | float = value if not isinstance(value, str) else math.nan
    if isinstance(value, str):
        try:
            number = int(value.strip())  # exact, also for long digit strings
        except ValueError:
            try:
                number = float(value)
            except (ValueError, OverflowError):
                raise ConfigError(key, value, "a whole number") from None
    if isinstance(number, float):
        if not (math.isfinite(number) and number.is_integer()):
            raise ConfigError(key, value, "a whole number")
        number = int(number)
    if not -INT_LIMIT < number < INT_LIMIT:
        raise ConfigError(key, value, "a whole number between -2**63 and 2**63")
    return number


def _split_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.strip("[]()").split(",") if v.strip()]
    return [value]


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse ``--set key=value`` items; values are read as YAML scalars (``0.1``, ``true``, ``[a, b]``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--set expects key=value, got {short_repr(item)}")
        try:
            value = safe_load_bounded(raw) if raw.strip() else None
        except (yaml.YAMLError, ValueError, RecursionError):  # not YAML (or a number too long): the raw string
            value = raw
        out[key] = coerce(key, value)
    return out


def from_mapping(data: Mapping[str, Any], base: Config | None = None) -> Config:
    """Build a config from a flat mapping of keys (dashes or underscores) on top of ``base``.

    The modules named by ``plugins`` are imported first: a method they register brings its parameters.
    """
    keyed = {str(k).replace("-", "_"): v for k, v in data.items()}
    if "plugins" in keyed:
        import_plugins(coerce("plugins", keyed["plugins"]))
    return (base or Config()).replace(**{key: coerce(key, value) for key, value in keyed.items()})


def import_plugins(modules: tuple[str, ...]) -> None:
    """Import the user's modules (they register models, datasets and methods with their parameters)."""
    for module in modules:
        import_module_or_file(module, "config key 'plugins'")


def load(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Config from an optional YAML file, then ``overrides`` (flags and ``--set``), validated."""
    data: dict[str, Any] = dict(read_yaml(path)) if path else {}
    if "grid" in data:
        raise UserError(f"'{path}' has a grid: it is a sweep config; run it with 'distillistic sweep'")
    if "plugins" in data and overrides and "plugins" in overrides:  # the file's methods' parameters too
        import_plugins(coerce("plugins", data["plugins"]))
    # One mapping, the flags over the file: a teacher_weights entry list is read against the final teachers.
    from_file = {str(k).replace("-", "_"): v for k, v in data.items()}
    for key in from_file.keys() & dict(overrides or {}).keys():  # a file's bad value is refused, flag or not
        coerce(key, from_file[key])
    merged = from_file | dict(overrides or {})
    cfg = from_mapping(merged)
    validate(cfg)
    return cfg


def save(cfg: Config, path: Path) -> None:
    from distillistic.fileio import atomic_write_text  # an OS failure is one line naming the file

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def import_plugins_named(argv: Sequence[str]) -> None:
    """Import the modules ``train --plugins A,B`` (or its config file's ``plugins:``) names, before the parser
    is built: a method they register brings its parameters, which become flags."""
    if not argv or argv[0] not in ("train", "tune"):
        return
    modules: list[str] = []
    for k, arg in enumerate(argv):
        if arg == "--plugins" and k + 1 < len(argv):
            modules += split_names(argv[k + 1])
        elif arg.startswith("--plugins="):
            modules += split_names(arg.split("=", 1)[1])
    config = next((a for a in argv[1:] if a.endswith((".yaml", ".yml")) and not a.startswith("-")), None)
    if config and Path(config).is_file():
        modules += list(coerce("plugins", read_yaml(config).get("plugins", ())))
    import_plugins(tuple(modules))
