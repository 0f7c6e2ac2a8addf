"""Sweep plans: a sweep file's base keys, ``grid:`` and ``variants:`` -> named, validated cells.

``grid`` maps config keys to lists of values (their product is taken); ``variants`` are named sets of
keys crossed with the grid (two cells of one algorithm, e.g. ``tfkd_smoothed: {algo: tfkd,
virtual_smooth: true}``, or a student size with the batch size that fits it). Each cell's name lists
its variant and grid values (``tfkd_smoothed,seed=1``), so it is readable and stable across re-runs.
Cells are ordered seed-major; :func:`shard` takes every n-th of them.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillistic import config as config_mod
from distillistic.config import MACHINE_KEYS, Config
from distillistic.errors import UserError, short_repr
from distillistic.methods import catalogue
from distillistic.methods.spec import OPTIONAL_KEYS

SEED_KEYS = ("seed", "data_seed")


RESERVED = ("out", "resume", "overwrite")  # the sweep decides these per cell


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: its directory name, the grid/variant values that define it and its config."""

    index: int
    name: str
    settings: dict[str, Any]
    config: Config  # validated, not resolved; ``out`` is set when the cell runs
    explicit: frozenset[str] = frozenset()  # keys the sweep file sets (named first when a folder disagrees)


@dataclass
class Plan:
    """A sweep file, expanded: the base keys, the axes and every cell in run order."""

    base: dict[str, Any]
    grid: dict[str, list[Any]]
    variants: dict[str, dict[str, Any]]
    cells: list[Cell]
    source: str | None = None


def value_text(value: Any) -> str:
    """A config value as a short text: ``0.001``, ``20``, ``true``, ``none``, lists joined by ``-``."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, list | tuple):
        return "-".join(value_text(v) for v in value)
    return str(value)


def plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _slug(text: str) -> str:
    """A file-name-safe part; long values (paths) keep their start and get a short hash."""
    safe = re.sub(r"[^A-Za-z0-9._+=-]", "_", text).strip("._") or "_"
    if len(safe) > 48:
        safe = f"{safe[:36]}~{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return safe


def cell_name(variant: str | None, values: Mapping[str, Any]) -> str:
    """``variant,key=value,...`` with the seed keys last, e.g. ``algo=kd,temperature=4,seed=1``."""
    keys = [k for k in values if k not in SEED_KEYS] + [k for k in SEED_KEYS if k in values]
    parts = ([_slug(variant)] if variant is not None else []) + [_slug(f"{k}={value_text(values[k])}") for k in keys]
    return ",".join(parts) or "run"


def _key(raw: Any, where: str) -> str:
    key = str(raw).replace("-", "_")
    if key in RESERVED:
        raise UserError(f"{where}: '{key}' is set by the sweep for each cell; remove it (use --out DIR for the sweep)")
    if not config_mod.is_key(key):
        close = difflib.get_close_matches(key, config_mod.all_keys(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"{where}: unknown config key '{key}'{hint}; see 'distillistic train --help' for the keys")
    return key


def _coerced(key: str, value: Any, where: str) -> Any:
    try:
        return config_mod.coerce(key, value)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _parse_grid(raw: Any, source: str) -> dict[str, list[Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise UserError(f"{source}: 'grid' must map config keys to lists of values, e.g. grid: {{seed: [0, 1, 2]}}")
    grid: dict[str, list[Any]] = {}
    for raw_key, values in raw.items():
        key = _key(raw_key, f"{source}: grid")
        if not isinstance(values, list) or not values:
            example = f"[{value_text(values)}]" if values not in ([], None, "") else "[v1, v2]"
            raise UserError(f"{source}: grid key '{key}' must be a non-empty list of values, e.g. {key}: {example}, "
                            f"not {short_repr(values)}")
        coerced = [_coerced(key, v, f"{source}: grid key '{key}'") for v in values]
        texts = [json.dumps(plain(v)) for v in coerced]
        if len(set(texts)) < len(texts):
            dup = next(t for t in texts if texts.count(t) > 1)
            raise UserError(f"{source}: grid key '{key}' lists the value {dup} twice; list each value once")
        grid[key] = coerced
    return grid


def _parse_variants(raw: Any, source: str, grid: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not raw:
        raise UserError(f"{source}: 'variants' must map names to settings, e.g. variants: "
                        "{tfkd_smoothed: {algo: tfkd, virtual_smooth: true}}")
    variants: dict[str, dict[str, Any]] = {}
    for name, settings in raw.items():
        where = f"{source}: variant '{name}'"
        if not isinstance(settings, Mapping):
            raise UserError(f"{where} must be a mapping of config keys to values, not {short_repr(settings)}")
        values = {}
        for raw_key, value in settings.items():
            key = _key(raw_key, where)
            if key in grid:
                raise UserError(f"{where} sets '{key}', which is also a grid axis; set it in one place only")
            values[key] = _coerced(key, value, where)
        variants[str(name)] = values
    return variants


def expand(spec: Mapping[str, Any], overrides: Mapping[str, Any] | None = None, source: str = "sweep") -> Plan:
    """Cells of a sweep spec (base keys + ``grid`` + ``variants``), seed-major, every config validated.

    ``overrides`` (``--set``) replace base keys; they may not name an axis of the grid or a variant.
    """
    base_raw = {k: v for k, v in spec.items() if k not in ("grid", "variants")}
    if "plugins" in base_raw:  # a method they register brings its parameters (keys of the grid)
        config_mod.import_plugins(_coerced("plugins", base_raw["plugins"], source))
    grid = _parse_grid(spec.get("grid"), source)
    variants = _parse_variants(spec.get("variants"), source, grid)
    if not grid and not variants:
        raise UserError(f"{source}: no 'grid' (and no 'variants'): a sweep needs axes, e.g. grid: {{seed: [0, 1, 2]}}; "
                        "for a single run use 'distillistic train'")
    base = {_key(k, source): v for k, v in base_raw.items()}
    base = {k: _coerced(k, v, source) for k, v in base.items()}
    axis_keys = set(grid) | {k for v in variants.values() for k in v}
    for key, value in (overrides or {}).items():
        key = _key(key, "--set")
        if key in axis_keys:
            raise UserError(f"--set {key}: '{key}' is an axis of the sweep (grid or variants); edit the sweep file")
        base[key] = _coerced(key, value, "--set")
    seed_axes = [k for k in grid if k in SEED_KEYS]
    other_axes = [k for k in grid if k not in SEED_KEYS]
    variant_names: list[str | None] = list(variants) or [None]
    cells: list[Cell] = []
    for seeds in itertools.product(*(grid[k] for k in seed_axes)):
        for variant in variant_names:
            for values in itertools.product(*(grid[k] for k in other_axes)):
                settings = dict(zip(other_axes, values)) | dict(zip(seed_axes, seeds))
                cells.append(_cell(len(cells), base, variants.get(variant or "", {}), variant, settings, source))
    _check_unique(cells)
    _check_read(base, cells, source)
    return Plan(base, grid, variants, cells, source)


def _cell(index: int, base: Mapping[str, Any], variant_values: Mapping[str, Any], variant: str | None,
          settings: dict[str, Any], source: str) -> Cell:
    from distillistic.training import setup  # torch: only when a sweep is planned, never for a report

    name = cell_name(variant, settings)
    try:
        algo = {**base, **variant_values, **settings}.get("algo", config_mod.default_of("algo"))
        # a shared key of the sweep (or an axis crossed with several methods) reaches only the cells that read it
        config_mod.validate(config_mod.from_mapping({**base, **variant_values, **settings}))  # every value, read or not
        base, read = read_by(algo, base), read_by(algo, settings)
        cfg = config_mod.from_mapping({**base, **variant_values, **read})
        setup.check_given(setup.resolve(cfg), {*variant_values, *read})  # the cell's own keys, not the shared ones
    except UserError as e:
        raise UserError(f"{source}: cell '{name}': {e}") from None
    full = {"variant": variant, **settings} if variant is not None else dict(settings)
    return Cell(index, name, full, _absolute_paths(cfg), frozenset({*base, *variant_values, *read}))


def read_by(algo: str, base: Mapping[str, Any]) -> dict[str, Any]:
    """The base keys that method ``algo`` reads (every common key, and the optional ones and parameters it uses)."""
    spec = catalogue.specs().get(algo)
    if spec is None:
        return dict(base)
    optional = {*OPTIONAL_KEYS, *catalogue.params()}
    return {k: v for k, v in base.items() if k not in optional or k in spec.keys_read()}


def _check_read(base: Mapping[str, Any], cells: Sequence[Cell], source: str) -> None:
    """Refuse a base key that no cell's method reads (it would be silently ignored by every cell)."""
    for key, value in base.items():
        if value != config_mod.default_of(key) and not any(key in c.explicit for c in cells):
            owners = ", ".join(catalogue.owners(key)) or "no method"
            raise UserError(f"{source}: config key '{key}' is read by no cell's algorithm (it is read by {owners}); "
                            "remove it or add a cell that reads it")


def _absolute_paths(cfg: Config) -> Config:
    """Relative data and cache folders are read from the current directory once, so a resumed cell finds them."""
    changes = {k: os.path.abspath(Path(v).expanduser()) for k in ("data_root", "cache_dir")
               if (v := getattr(cfg, k)) and not Path(v).expanduser().is_absolute()}
    return cfg.replace(**changes) if changes else cfg


def _check_unique(cells: list[Cell]) -> None:
    """Two cells whose names collapse to one folder (values differing only in unsafe characters) get a hash."""
    seen: dict[str, int] = {}
    for c in cells:
        seen[c.name] = seen.get(c.name, 0) + 1
    for i, c in enumerate(cells):
        if seen[c.name] > 1:
            digest = hashlib.sha1(json.dumps(c.settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
            cells[i] = Cell(c.index, f"{c.name},{digest}", c.settings, c.config, c.explicit)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` with ``0 <= i < n`` (e.g. ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`` for ``--array=0-(n-1)``)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise UserError(f"--shard '{text}' must be i/n with 0 <= i < n (e.g. 0/4 ... 3/4 for four shards)")
    return int(match[1]), int(match[2])


def shard(cells: Sequence[Cell], index: int, count: int) -> list[Cell]:
    """Every ``count``-th cell starting at ``index``: the shards are disjoint and together cover the sweep."""
    return [c for c in cells if c.index % count == index]


def comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    """The keys that decide what a run computes (the config minus machine and volatile keys)."""
    return {k: plain(v) for k, v in config.items() if k not in MACHINE_KEYS}
