"""Resuming a run: ``last.pt`` loaded into the task, refused when it belongs to another run.

The config (apart from the keys that never change what a run computes), the teacher's weights and the data's
checksum must be the ones the run started with; a checkpoint that does not fit the models is one line, not a
traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distillistic.config import VOLATILE_KEYS
from distillistic.errors import CheckpointError, UserError, short_repr
from distillistic.training.checkpoint import check_format, load
from distillistic.training.engine import Progress, Task
from distillistic.training.runtime import set_rng_state


def restore_state(path: Path, task: Task, teacher: dict[str, Any] | None = None,
                  data_checksum: str | None = None) -> Progress:
    """Load ``last.pt`` into the task's models, optimisers, schedules, scaler and RNG; return the progress.

    Refuses a checkpoint whose config (apart from :data:`VOLATILE_KEYS`) or teacher differs from
    this run's: continuing with other settings would silently mix two experiments.
    """
    ckpt = load(path)
    check_format(ckpt, path)
    if ckpt.get("kind") != "last" or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"'{path}' is not a resumable checkpoint (kind {short_repr(ckpt.get('kind'))}); "
                              "start a new --out")
    saved = ckpt["config"]
    current = task.cfg.to_dict()
    differ = [k for k in current if k not in VOLATILE_KEYS and saved.get(k) != current[k]]
    if differ:
        k = differ[0]
        raise UserError(f"--resume: the config differs from the run being resumed ({k}: {short_repr(saved.get(k))} -> "
                        f"{short_repr(current[k])}{f' and {len(differ) - 1} more' if len(differ) > 1 else ''}); "
                        "resume with the same settings, or start a new --out")
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


def _check_data(ckpt: dict[str, Any], path: Path, data_checksum: str | None) -> None:
    """Refuse to resume on data other than the run started with (its checksum is in last.pt)."""
    saved = ckpt.get("data_checksum")
    if saved is not None and data_checksum is not None and saved != data_checksum:
        raise UserError(f"--resume: the data differs from the run being resumed (the dataset's checksum changed "
                        f"since it started: {path.parent.parent / 'manifest.json'} has the old one); resume with the "
                        "same data, or start a new --out")

