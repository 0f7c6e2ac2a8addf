"""Threads that fit the machine: the cores this process may really use, shared by the runs started at once.

``os.cpu_count()`` (and torch's default thread count) sees every core of the host, not the ones a
container's CPU quota or a job's affinity mask grant; on a busy or shared machine a run with that
many threads slows several-fold. This module reads both limits (no torch import: the CLI uses it).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

RUNS_ENV = "DISTILLISTIC_PARALLEL_RUNS"  # runs started at once on this machine (sweep shards side by side)


def _affinity() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """Cores granted by a cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), or None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def available_cores() -> int:
    """The smaller of the affinity mask and the cgroup quota (rounded up), at least 1."""
    cores = _affinity()
    quota = cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def parallel_runs() -> int:
    """Runs sharing this machine: ``$DISTILLISTIC_PARALLEL_RUNS`` (default 1)."""
    try:
        return max(1, int(os.environ.get(RUNS_ENV, "1")))
    except ValueError:
        return 1


def default_threads(runs: int | None = None) -> int:
    """Intra-op threads for one run: the available cores split between the ``runs`` started at once."""
    return max(1, available_cores() // (runs or parallel_runs()))
