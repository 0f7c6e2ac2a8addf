"""One torchrun launch for the CLI runs of many tests (two ranks, Gloo on the CPU).

A torchrun launch costs some 12 CPU-s before it trains anything (the launcher and two ranks importing torch),
more than the tiny runs the tests launch. So a test module declares its runs as :class:`Job` s at import, and
the first test that asks for one (:func:`outcome`) launches every job of the selected tests at once: one
``torch.distributed.run --nproc_per_node 2`` of ``tests/_torchrun_batch.py``, whose ranks join one process group
and run the jobs one after another, each through ``distillistic.cli.main`` (as ``python -m distillistic`` does)
with its own folder, cache, stdout and stderr per rank, and exit code per rank. The launch runs once for the
whole test session (every xdist worker): the first worker to need it holds a lock in the session's temporary
folder while it runs, the others then read its files.

A run that must be killed, stopped by a signal or resumed in fresh processes keeps a launch of its own.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import distillistic
from _util import session_root

SRC = str(Path(distillistic.__file__).resolve().parents[1])
RUNNER = str(Path(__file__).with_name("_torchrun_batch.py"))
FOLDER = "{job}"  # in a job's arguments: its own folder (its runs' --out go under it)
TIMEOUT_S = 600  # the whole launch (about 20 s on 2 cores); a job that hangs a rank ends it (Gloo: 5 minutes)


@dataclass(frozen=True)
class Job:
    """A CLI run under torchrun: ``argv`` for every rank (``RANK1:``-prefixed items only on rank 1, as a node
    given other flags), run by the test ``owner`` (``file.py::function``); ``imports``: modules under tests/
    imported first (a test-only method); ``prepare``: writes the job's inputs into its folder first."""

    name: str
    owner: str
    argv: tuple[str, ...]
    imports: tuple[str, ...] = ()
    prepare: Callable[[Path], None] | None = field(default=None, compare=False)
    early: bool = False  # run before the trainings, as in fresh processes (its stderr is read line for line)


@dataclass(frozen=True)
class Outcome:
    """A job's folder and, per rank, its exit code, stdout and stderr."""

    folder: Path
    codes: dict[int, int]
    out: dict[int, str]
    err: dict[int, str]

    @property
    def stdout(self) -> str:
        """Both ranks' stdout, as the launcher's own stdout carries it."""
        return "".join(self.out[r] for r in sorted(self.out))

    def tail(self) -> str:
        return "\n".join(f"rank {r} (exit {self.codes.get(r)}):\n{self.err[r][-3000:]}" for r in sorted(self.err))


JOBS: dict[str, Job] = {}


def job(name: str, owner: str, *argv: str, imports: tuple[str, ...] = (),
        prepare: Callable[[Path], None] | None = None, early: bool = False) -> Job:
    """Declare a job (at a test module's import); its test reads it with :func:`outcome`."""
    new = Job(name, owner, tuple(argv), imports, prepare, early)
    if JOBS.setdefault(name, new) != new:
        raise ValueError(f"two torchrun jobs named {name!r}")
    return new


def _owner(item: pytest.Item) -> str:
    return f"{item.path.name}::{getattr(item, 'originalname', item.name)}"


def _selected(session: pytest.Session) -> list[Job]:
    """The jobs of the tests this session runs (every xdist worker collects the same): the early ones first,
    those that import a module of their own last (the module stays imported for the jobs after it)."""
    owners = {_owner(item) for item in session.items}
    return sorted((j for j in JOBS.values() if j.owner in owners),
                  key=lambda j: (not j.early, bool(j.imports), j.name))


def _launch(folder: Path, jobs: list[Job]) -> dict[str, object]:
    """Run ``jobs`` in one torchrun launch with their folders under ``folder``: the launcher's exit code and
    output tails."""
    for j in jobs:
        (folder / j.name).mkdir(parents=True)
        if j.prepare is not None:
            j.prepare(folder / j.name)
    spec = [{"name": j.name, "folder": str(folder / j.name), "imports": list(j.imports),
             "argv": [a.replace(FOLDER, str(folder / j.name)) for a in j.argv]} for j in jobs]
    (folder / "jobs.json").write_text(json.dumps(spec, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([SRC, str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    env.pop("DISTILLISTIC_FAULT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", RUNNER,
           str(folder / "jobs.json")]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        return {"code": proc.returncode, "stdout": proc.stdout[-3000:], "stderr": proc.stderr[-6000:]}
    except subprocess.TimeoutExpired as e:
        return {"code": None, "stdout": str(e.stdout or "")[-3000:], "stderr": f"timed out after {TIMEOUT_S} s"}


def _batch(request: pytest.FixtureRequest) -> tuple[Path, dict[str, object]]:
    """The session's launch folder, launched by the first caller (under a lock), and its launcher's record."""
    jobs = _selected(request.session)
    key = hashlib.sha256(json.dumps([(j.name, j.argv, j.imports) for j in jobs]).encode()).hexdigest()[:12]
    root = session_root(request.getfixturevalue("tmp_path_factory"))
    folder = root / f"torchrun-batch-{key}"
    with open(root / f"torchrun-batch-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = folder / "launch.json"
        if not done.is_file():
            folder.mkdir()
            done.write_text(json.dumps(_launch(folder, jobs)))
    return folder, json.loads(done.read_text())


def outcome(request: pytest.FixtureRequest, name: str) -> Outcome:
    """Job ``name``'s outcome (the session's launch runs first if it has not yet); fails the test, with the
    launcher's output, where the job did not end on both ranks."""
    assert JOBS[name].owner == _owner(request.node), f"{name} belongs to {JOBS[name].owner}"
    root, launch = _batch(request)
    folder = root / name
    codes = {r: int(p.read_text()) for r in (0, 1) if (p := folder / f"rank{r}.code").is_file()}
    if sorted(codes) != [0, 1]:
        pytest.fail(f"torchrun job {name} did not end on both ranks; the launch: {json.dumps(launch, indent=1)}")
    read = {r: ((folder / f"rank{r}.out").read_text(), (folder / f"rank{r}.err").read_text()) for r in (0, 1)}
    return Outcome(folder, codes, {r: o for r, (o, _) in read.items()}, {r: e for r, (_, e) in read.items()})
