"""Sweeps: one YAML file -> a grid of runs, each in its own run directory; resumable and shardable.

A sweep file holds base config keys, a ``grid:`` mapping keys to lists of values, and optionally
``variants:``, named sets of keys crossed with the grid (two cells of one algorithm, e.g.
``tfkd_smoothed: {algo: tfkd, virtual_smooth: true}``, or a student size with the batch size that
fits it); see ``configs/``.

Every cell runs through :func:`distillistic.training.run.train` in ``DIR/<name>``, where the name lists the
cell's variant and grid values (``tfkd_smoothed,seed=1``), so it is readable and stays the same
when the sweep is run again. Re-running a sweep skips completed cells, resumes interrupted ones from
their ``checkpoints/last.pt`` and retries failed ones; ``shard=(i, n)`` runs every n-th cell, so
a sweep spreads over machines or a SLURM array with no extra service. Cells run seed-major (every
setting with the first seed, then the next seed), so a sweep stopped half-way already holds one
complete comparison.
"""

from __future__ import annotations

import fcntl
import logging
import os
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distillistic import config as config_mod
from distillistic.errors import UserError, short_repr
from distillistic.experiments.grid import Cell, Plan, comparable, expand, plain, shard
from distillistic.locks import holder_of, try_lock
from distillistic.methods import catalogue
from distillistic.runs.rundir import RUN_FILES, read_summary
from distillistic.training import setup
from distillistic.training.checkpoint import atomic_write_json, atomic_write_text

log = logging.getLogger("distillistic")


@dataclass
class Outcome:
    cell: Cell
    status: str  # completed (ran now), skipped (already complete), failed, interrupted, busy, pending
    message: str = ""


@dataclass
class SweepResult:
    out: Path
    outcomes: list[Outcome] = field(default_factory=list)

    def with_status(self, status: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def failures(self) -> list[Outcome]:
        return self.with_status("failed")

    @property
    def interrupted(self) -> bool:
        return bool(self.with_status("interrupted"))


# --- expanding a sweep file ---------------------------------------------------------------------------


# --- the state of a cell's directory --------------------------------------------------------------------


def cell_state(cell: Cell, folder: Path) -> tuple[str, str]:
    """What to do with a cell: ``new``, ``done``, ``resume``, ``restart``, ``diverged`` or ``conflict`` (+ why)."""
    if not folder.is_dir() or not any((folder / f).exists() for f in RUN_FILES):
        return "new", ""
    saved_path = folder / "config.yaml"
    if saved_path.is_file():
        try:
            saved = yaml.safe_load(saved_path.read_text()) or {}
        except yaml.YAMLError:
            saved = None
        if isinstance(saved, dict):
            want = comparable(setup.resolve(cell.config).to_dict())
            have = comparable(saved)  # a key it lacks is newer than the run: its default applied then
            # derived from another run: the folder's is the derived one
            for key, source in catalogue.derived_keys().items():
                if want.get(source) is not None:
                    want.pop(key, None)
            differ = sorted((k for k in want if k in have and have[k] != want[k]),
                            key=lambda k: k not in cell.explicit)
            if differ:
                k = differ[0]
                more = f"; also {', '.join(differ[1:4])}{' ...' if len(differ) > 4 else ''}" if len(differ) > 1 else ""
                return "conflict", (f"{k}: {short_repr(have.get(k))} in the folder, {short_repr(want[k])} in the "
                                    f"sweep{more}")
    summary = read_summary(folder)
    if summary.get("status") == "completed":
        return "done", ""
    if summary.get("status") == "diverged":
        return "diverged", str(summary.get("reason") or "the loss became NaN or inf")
    if (folder / "checkpoints" / "last.pt").is_file():
        return "resume", ""
    return "restart", ""


# --- running --------------------------------------------------------------------------------------------


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def _cell_lock(out: Path, name: str) -> Iterator[str | None]:
    """Hold a lock on a cell so two sweeps started on one folder never run it twice at once: yields ``None``
    when this process holds it, else who holds it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun every rank runs the cell together
        yield None
        return
    locks = out / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / f"{name}.lock"
    with path.open("a") as handle:
        if not try_lock(handle):
            yield holder_of(path)[0]
            return
        try:
            yield None
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_plan(plan: Plan, out: Path) -> None:
    """``DIR/sweep.yaml`` (the sweep as run, overrides included) and ``DIR/plan.json`` (every cell's config)."""
    out.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {k: plain(v) for k, v in plan.base.items()}
    if plan.variants:
        spec["variants"] = {n: {k: plain(v) for k, v in s.items()} for n, s in plan.variants.items()}
    spec["grid"] = {k: [plain(v) for v in vs] for k, vs in plan.grid.items()}
    header = f"# the sweep run in this folder (from {plan.source}); re-run: distillistic sweep {out / 'sweep.yaml'} " \
             f"--out {out}\n"
    atomic_write_text(out / "sweep.yaml", header + yaml.safe_dump(spec, sort_keys=False))
    cells = [{"index": c.index, "name": c.name, "settings": {k: plain(v) for k, v in c.settings.items()},
              "config": setup.resolve(c.config).to_dict()} for c in plan.cells]
    atomic_write_json(out / "plan.json", {"source": plan.source, "cells": cells})


def run_cell(cell: Cell, out: Path, state: str, wandb: bool | None = None) -> Outcome:
    """Train one cell in ``out/<name>`` (fresh, resumed or restarted); failures become an :class:`Outcome`."""
    from distillistic.training.run import train

    folder = out / cell.name
    cfg = cell.config.replace(out=str(folder), resume=state == "resume", overwrite=state == "restart")
    if wandb is not None:
        cfg = cfg.replace(wandb=wandb)
    if cfg.wandb:
        os.environ.setdefault("WANDB_RUN_GROUP", out.name)  # the sweep's runs form one W&B group
    error_file = folder / "error.txt"
    try:
        result = train(cfg)
    except Exception as e:  # bad data, a bug or an out-of-memory error in one cell must not stop the others
        user = isinstance(e, UserError)
        if _is_main():  # the full message or traceback stays beside the cell
            folder.mkdir(parents=True, exist_ok=True)
            error_file.write_text(f"{e}\n" if user else traceback.format_exc())
        message = str(e).strip().splitlines()[-1] if user else f"{type(e).__name__}: {e} (traceback in {error_file})"
        return Outcome(cell, "failed", message)
    error_file.unlink(missing_ok=True)
    if result.summary.get("status") == "completed":
        return Outcome(cell, "completed")
    return Outcome(cell, "interrupted", f"stopped at epoch {result.summary.get('epochs_completed', 0)}")


def run_sweep(source: str | Path | Mapping[str, Any], out: str | Path, shard_spec: tuple[int, int] = (0, 1),
              overrides: Mapping[str, Any] | None = None, wandb: bool | None = None, fail_fast: bool = False,
              dry_run: bool = False) -> SweepResult:
    """Run (or, with ``dry_run``, only plan) this shard's cells of a sweep in ``out``; the Python API of
    ``distillistic sweep``. A failed cell is recorded and the sweep goes on (unless ``fail_fast``); an
    interrupted cell (Ctrl-C, SIGTERM) stops the sweep, and running it again continues where it stopped.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; choose a directory for the sweep")
    plan = (expand(source, overrides) if isinstance(source, Mapping)
            else expand(config_mod.read_yaml(source), overrides, source=str(source)))
    cells = shard(plan.cells, *shard_spec)
    states = {c.name: cell_state(c, out / c.name) for c in cells}
    conflicts = [(c, states[c.name][1]) for c in cells if states[c.name][0] == "conflict"]
    if conflicts:
        c, why = conflicts[0]
        more = f" (and {len(conflicts) - 1} more cells)" if len(conflicts) > 1 else ""
        raise UserError(f"'{out / c.name}' holds a run of another config ({why}){more}; restore the sweep's "
                        "settings, choose another --out, or delete that folder to run the cell again")
    result = SweepResult(out)
    if dry_run:
        result.outcomes = [Outcome(c, "pending", states[c.name][0]) for c in cells]
        return result
    if _is_main():
        write_plan(plan, out)
    for k, cell in enumerate(cells, 1):
        outcome = _step(cell, out, k, len(cells), wandb)
        result.outcomes.append(outcome)
        if outcome.status == "interrupted" or (fail_fast and outcome.status == "failed"):
            break
    return result


def _step(cell: Cell, out: Path, k: int, total: int, wandb: bool | None) -> Outcome:
    where = f"[{k}/{total}] {cell.name}"
    with _cell_lock(out, cell.name) as holder:
        if holder is not None:
            log.warning("%s: running in another process (%s holds %s); skipped here", where, holder,
                        out / ".locks" / f"{cell.name}.lock")
            return Outcome(cell, "busy", f"running in another process ({holder})")
        state, why = cell_state(cell, out / cell.name)  # again: another shard may have finished it meanwhile
        if state == "done":
            log.info("%s: already complete, skipped", where)
            return Outcome(cell, "skipped")
        if state == "diverged":
            log.warning("%s: diverged in an earlier attempt (%s); delete its folder to run it again", where, why)
            return Outcome(cell, "failed", f"diverged earlier: {why}; delete {out / cell.name} to run it again")
        log.info("%s: %s", where, {"new": "running", "resume": "resuming from its last checkpoint",
                                   "restart": "restarting (it stopped before its first checkpoint)"}[state])
        outcome = run_cell(cell, out, state, wandb)
    if outcome.status == "failed":
        log.error("%s: failed: %s", where, outcome.message)
    return outcome


def describe(result: SweepResult) -> str:
    """A few lines: counts per status, then every failed cell with its reason."""
    counts = {s: len(result.with_status(s)) for s in ("completed", "skipped", "failed", "busy", "interrupted")}
    parts = [f"{n} {s}" for s, n in counts.items() if n]
    lines = [f"sweep {result.out}: {len(result.outcomes)} cells handled" + (f" ({', '.join(parts)})" if parts else "")]
    if result.interrupted:
        lines.append("interrupted: run the same command again to continue (finished cells are skipped, the "
                     "interrupted one resumes)")
    busy = result.with_status("busy")
    if busy:
        lines.append(f"{len(busy)} cells were running in another process (another sweep on this folder): "
                     f"{', '.join(o.cell.name for o in busy[:5])}{' ...' if len(busy) > 5 else ''}")
    for o in result.failures:
        lines.append(f"  FAILED {o.cell.name}: {o.message}")
    if not result.failures and not result.interrupted and not busy:
        lines.append(f"aggregate with: distillistic report {result.out}")
    return "\n".join(lines)
