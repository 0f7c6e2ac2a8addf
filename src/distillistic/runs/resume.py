"""Resuming a run: ``last.pt`` loaded into the task, refused when it belongs to another run.

The config (apart from the keys that never change what a run computes), the teacher's weights and the data's
checksum must be the ones the run started with; a checkpoint that does not fit the models is one line, not a
traceback.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from distillistic.config import MACHINE_KEYS
from distillistic.errors import CheckpointError, UserError, short_repr
from distillistic.runs.rundir import RunDir, machine_facts
from distillistic.training.checkpoint import check_format, load, state_dict_hash
from distillistic.training.engine import Progress, Task
from distillistic.training.runtime import set_rng_state

log = logging.getLogger("distillistic")


def restore_state(path: Path, task: Task, teacher: dict[str, Any] | None = None,
                  data_checksum: str | None = None) -> Progress:
    """Load ``last.pt`` into the task's models, optimisers, schedules, scaler and RNG; return the progress.

    Refuses a checkpoint whose config (apart from :data:`MACHINE_KEYS`) or teacher differs from
    this run's: continuing with other settings would silently mix two experiments.
    """
    ckpt = load(path)
    check_format(ckpt, path)
    if ckpt.get("kind") != "last" or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"'{path}' is not a resumable checkpoint (kind {short_repr(ckpt.get('kind'))}); "
                              "start a new --out")
    _check_config(ckpt, task)
    _check_data(ckpt, path, data_checksum)
    saved_teacher = ckpt.get("teacher")
    if (saved_teacher or {}).get("sha256") != (teacher or {}).get("sha256"):
        def show(t: dict[str, Any] | None) -> str:
            return f"{t.get('arch')} from {t.get('source')} (weights {str(t.get('sha256'))[:12]})" if t else "none"

        raise CheckpointError(f"--resume: the teacher differs from the one the run started with "
                              f"({show(saved_teacher)} -> {show(teacher)}); resume with the same teacher "
                              "weights, or start a new --out")
    try:
        for s in task.students:
            s.raw.load_state_dict(ckpt["models"][s.name])
        for opt, state in zip(task.optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
        for sched, state in zip(task.schedulers, ckpt["schedulers"]):
            sched.load_state_dict(state)
        task.rt.scaler.load_state_dict(ckpt["scaler"])
        task.objective.load_state_dict(ckpt.get("terms") or {})
        set_rng_state(ckpt["rng"])
        progress = Progress(**ckpt["progress"])
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"checkpoint '{path}' does not match this run ({type(e).__name__}: {first}); "
                              "start a new --out") from None
    progress.meters = ckpt.get("meters")
    return progress


def refuse_other_config(saved: dict[str, Any], current: dict[str, Any], what: str = "the run being resumed") -> None:
    """:class:`UserError` when ``current`` (a config's :meth:`to_dict`) differs from the ``saved`` one in a key
    that changes what a run computes (any but :data:`MACHINE_KEYS`)."""
    differ = [k for k in current if k not in MACHINE_KEYS and saved.get(k) != current[k]]
    if differ:
        k = differ[0]
        raise UserError(f"--resume: the config differs from {what} ({k}: {short_repr(saved.get(k))} -> "
                        f"{short_repr(current[k])}{f' and {len(differ) - 1} more' if len(differ) > 1 else ''}); "
                        "resume with the same settings, or start a new --out")


def _check_config(ckpt: dict[str, Any], task: Task) -> None:
    """Refuse a config other than the run's (apart from :data:`MACHINE_KEYS`); a resume on another device,
    thread count or compilation proceeds, with one line saying that bit-exactness needs the same."""
    saved, current = ckpt["config"], task.cfg.to_dict()
    refuse_other_config(saved, current)
    before: dict[str, Any] = ckpt["machine"] if isinstance(ckpt.get("machine"), dict) else {}
    now, moved = machine_facts(task.rt), []
    for key in ("device", "threads", "compile"):
        if key in now and key in before and before[key] != now[key]:
            moved.append(f"{key} {before[key]} -> {now[key]}")
        elif saved.get(key) != current.get(key):
            moved.append(f"{key} {short_repr(saved.get(key))} -> {short_repr(current.get(key))}")
    if moved:
        log.warning("--resume on another machine setting (%s): continuing; the run is then not bit-identical to "
                    "an uninterrupted one, which needs the same device, threads and compilation", ", ".join(moved))


def _check_data(ckpt: dict[str, Any], path: Path, data_checksum: str | None) -> None:
    """Refuse to resume on data other than the run started with (its checksum is in last.pt)."""
    saved = ckpt.get("data_checksum")
    if saved is not None and data_checksum is not None and saved != data_checksum:
        raise UserError(f"--resume: the data differs from the run being resumed (the dataset's checksum changed "
                        f"since it started: {path.parent.parent / 'manifest.json'} has the old one); resume with the "
                        "same data, or start a new --out")



def check_best_files(rundir: RunDir, task: Task, progress: Progress) -> None:
    """Check every ``best-<model>.pt`` a resumed run will select at its end, now rather than after more epochs.

    A best file must be whole (its sha256) and be the one this run wrote (the sha256 of its weights that
    ``last.pt`` recorded). One that is missing, damaged or another run's is set aside as
    ``best-<model>.pt.rejected`` with one line, never used: while epochs remain, the model's best-on-val record
    restarts with the next one; when none remain, the last epoch's weights (sound, in ``last.pt``) become its
    best, with that epoch's validation metrics.
    """
    for s in [*task.students, *task.members]:
        if s.name not in progress.best:
            continue
        path = rundir.best_path(s.name)
        problem = _best_problem(path, progress, s.name)
        if problem is None:
            continue
        if rundir.rt.is_main and path.exists():
            path.replace(path.with_name(path.name + ".rejected"))
        remaining = progress.epoch < task.cfg.epochs
        log.warning("--resume: %s %s; set aside as %s.rejected and not used: %s", path, problem, path.name,
                    "its best-on-val record restarts with the next epoch" if remaining else
                    f"the last epoch's weights (from last.pt) are its best, epoch {progress.epoch}")
        del progress.best[s.name]
        progress.best_files.pop(s.name, None)
        if not remaining:
            row = next((r for r in reversed(progress.history) if r.get("model") == s.name and r.get("split") == "val"),
                       None)
            progress.best[s.name] = {k: v for k, v in (row or {}).items() if k not in ("model", "split")} | {
                "epoch": progress.epoch}
            if rundir.rt.is_main:
                rundir.save_best(task, progress, s.name, s.raw.state_dict())


def _best_problem(path: Path, progress: Progress, name: str) -> str | None:
    """What is wrong with the best file ``path`` of model ``name`` (``None``: it is this run's, whole)."""
    if not path.is_file():
        return "is missing"
    try:
        obj = load(path)
    except CheckpointError as e:
        return "is damaged (its content differs from its sha256)" if "integrity check" in str(e) else \
            "is damaged (it cannot be read as a checkpoint)"
    models: dict[str, Any] = obj["models"] if isinstance(obj.get("models"), dict) else {}
    recorded = progress.best_files.get(name)
    ours = recorded is not None and name in models and state_dict_hash(models[name]) == recorded
    return None if ours else ("is not the file this run wrote (the sha256 of its weights differs from the one "
                              "last.pt recorded: another run's, or another seed's)")
