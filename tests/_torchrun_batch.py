"""The ranks' side of :mod:`_torchrun`: ``torchrun --nproc_per_node 2 _torchrun_batch.py jobs.json``.

Each rank joins one process group (a run joins the group it finds, and leaves it alone), then runs the jobs
one after another as ``python -m distillistic`` would: ``distillistic.cli.main(argv)`` with stdout and stderr
(file descriptors 1 and 2) in the job's files, the environment and working folder the launch started with (the
job's own cache), and writes the exit code. The ranks wait for each other between jobs.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import sys
import traceback
from pathlib import Path

import torch.distributed as dist


def _argv(argv: list[str], rank: int) -> list[str]:
    """The arguments of this rank: those prefixed ``RANK1:`` only on rank 1."""
    return [a.replace("RANK1:", "") for a in argv if rank == 1 or not a.startswith("RANK1:")]


def _call(argv: list[str]) -> int:
    from distillistic.cli import main

    try:
        return main(argv)
    except SystemExit as e:  # argparse
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # the job fails, its traceback in its stderr, as a process's would be
        traceback.print_exc()
        return 1


def run_job(job: dict[str, object], rank: int, env: dict[str, str], cwd: str) -> int:
    """Run one job on this rank with its outputs in its folder; its exit code."""
    folder = Path(str(job["folder"]))
    os.environ.clear()
    os.environ.update(env)
    os.environ["DISTILLISTIC_CACHE"] = str(folder / "cache")
    os.chdir(cwd)
    for name in job["imports"]:  # type: ignore[attr-defined]
        importlib.import_module(name)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(folder / f"rank{rank}.out", "w") as out, open(folder / f"rank{rank}.err", "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            code = _call(_argv(list(job["argv"]), rank))  # type: ignore[call-overload]
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    return code


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    env, cwd = dict(os.environ), os.getcwd()
    for job in jobs:
        code = run_job(job, rank, env, cwd)
        (Path(job["folder"]) / f"rank{rank}.code").write_text(str(code))
        print(f"rank {rank}: {job['name']} exit {code}", flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
