"""A teacher's own training cost: what its run recorded, and how many runs shared that teacher.

A teacher trained first into the cache (``--teacher-weights train``) is one run directory whose
``summary.json`` holds its ``train_flops`` and ``train_seconds``. Every run that distils from it adds its
own output folder to the teacher's ``shared_by.txt``, so the teacher's cost can be divided among the runs
that used it. Pretrained or given weights have no recorded cost (``null``, with the reason).
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any

SHARED_BY = "shared_by.txt"


def _recorded(folder: Path) -> dict[str, Any] | None:
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def register_user(folder: Path, run: Path) -> int:
    """Add ``run`` to the teacher folder's list of runs that used it (once); return how many runs did."""
    path = folder / SHARED_BY
    with path.open("a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # sweep shards finishing together
        f.seek(0)
        users = [line.strip() for line in f if line.strip()]
        if str(run) not in users:
            f.write(f"{run}\n")
            users.append(str(run))
    return len(users)


def teacher_training_cost(source: str, run: Path, cache: Path) -> dict[str, Any]:
    """The training cost of the teacher whose weights came from ``source`` (a path, ``imagenet``, ``random``).

    A teacher in the cache's ``teachers`` folder records ``run`` as one of the runs sharing it.
    """
    folder = Path(source).expanduser()
    summary = _recorded(folder) if folder.is_dir() else None
    if summary is None:
        why = {"imagenet": "pretrained ImageNet weights", "random": "random weights, not trained"}.get(
            source, "weights given by the user (no run directory with a summary)")
        return {"train_flops": None, "train_seconds": None, "shared_by": None, "source": source, "note": why}
    cached = folder.resolve().parent == (cache / "teachers").resolve()
    shared = register_user(folder, run.resolve()) if cached else None
    return {"train_flops": summary.get("train_flops"), "train_seconds": summary.get("train_seconds"),
            "epochs": summary.get("epochs_completed"), "shared_by": shared, "source": source,
            "note": "trained first into the cache" if cached else "a run directory"}
