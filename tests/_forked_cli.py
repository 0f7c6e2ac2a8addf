"""``python -m distillistic ARGS`` in a real child process that starts in milliseconds: forked from a server.

A training process spends about 4.5 of its 5 CPU seconds importing torch (and ``torch._dynamo``, which the
optimisers import) before it trains anything. The kill/resume tests start dozens of such processes; this module
starts instead, per test process, a small server (:func:`_serve`: this file run as a script) that imports torch and
every distillistic module once, then forks one child per request. Each child is a process of its own (own pid,
own session, like ``subprocess.run(..., start_new_session=True)``) that runs ``distillistic/__main__.py`` as
``python -m distillistic`` does, with the request's argument list, environment and working directory, and exits as
an interpreter does (``atexit``, stdio flushed, threads joined); signals kill it or reach its handlers as they
would a fresh process, and :func:`run` returns its exit code the way ``subprocess`` does (``-9`` when killed).

What a fork shares with its siblings, a fresh process would draw anew: the child reseeds Python's, NumPy's and
torch's global generators from the system, as a fresh start does, and two servers, each with its own random
string-hash seed, take the requests in turn, so that consecutive processes of a kill/resume chain still differ in
hash seed as fresh ones would. What it cannot check: the cost and the import order of a fresh start
(``tests/test_light_commands.py`` and the CLI tests start fresh processes for that). With
``$DISTILLISTIC_TEST_FRESH=1``, and wherever ``os.fork`` is not safe with torch loaded (any system but Linux),
every child is a fresh ``subprocess`` instead: the same tests, at the old cost.

The server's own start-up and each child's CPU seconds (from ``wait4``, the child's waited-for children
included) are appended to ``$DISTILLISTIC_TEST_CPU`` when it is set, under the test's id followed by
``[forked CLI]``, since the test process never waits for those processes itself (see ``tests/conftest.py``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

import distillistic

SRC = str(Path(distillistic.__file__).resolve().parents[1])  # the distillistic the tests import
COMMAND = [sys.executable, "-m", "distillistic"]  # what a request's child runs, as a command line
SERVERS = 2  # servers taking the requests in turn: each has its own random string-hash seed
FRESH = os.environ.get("DISTILLISTIC_TEST_FRESH") == "1" or sys.platform != "linux"  # fresh processes instead


def _preload() -> None:
    """Import what a training run imports (torch, its compiler front end, torchvision for RandAugment and its
    models, every distillistic module)."""
    import importlib
    import pkgutil

    import numpy  # noqa: F401
    import torch._dynamo  # noqa: F401  (torch.optim's constructors import it)
    import torchvision  # noqa: F401

    for info in pkgutil.walk_packages(distillistic.__path__, "distillistic."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)


def _child(request: dict[str, Any]) -> None:
    """In the forked child: become ``python -m distillistic ARGS`` in a session of its own."""
    import random
    import runpy

    import numpy as np
    import torch

    os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for fd, target in ((null, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    random.seed()  # drawn from the system, as at a fresh start
    np.random.seed()
    torch.seed()
    script = request.get("script")
    if script:  # python SCRIPT ARGS: the script's folder first on the path
        sys.argv = [script, *request["argv"]]
        sys.path[0] = str(Path(script).resolve().parent)
        runpy.run_path(script, run_name="__main__")
    else:
        sys.argv = [sys.argv[0], *request["argv"]]
        sys.path[0] = os.getcwd()  # python -m puts the working directory first
        runpy.run_module("distillistic", run_name="__main__", alter_sys=True)
    sys.exit(0)  # a normal end of the script is exit 0


def _reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _serve() -> None:
    """Read one JSON request a line from stdin; fork a child for it; reply its pid, then its wait status."""
    import gc
    import resource

    _preload()
    gc.freeze()  # the children's collections leave the preloaded objects alone: no copy-on-write of their pages
    own = resource.getrusage(resource.RUSAGE_SELF)
    _reply({"ready": own.ru_utime + own.ru_stime, "threads": len(os.listdir("/proc/self/task"))})
    for line in iter(sys.stdin.buffer.readline, b""):
        request = json.loads(line)
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)  # never returns: SystemExit ends the child as it ends any interpreter
        _reply({"pid": pid})
        _, status, usage = os.wait4(pid, 0)
        _reply({"status": status, "cpu": usage.ru_utime + usage.ru_stime})


def _log_cpu(seconds: float, what: str) -> None:
    """Append ``seconds`` under the running test's id to ``$DISTILLISTIC_TEST_CPU`` (tests/conftest.py)."""
    path = os.environ.get("DISTILLISTIC_TEST_CPU")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
        with open(path, "a") as f:
            f.write(f"{seconds:.3f}\t{test} [{what}]\n")


class _Server:
    """One server process and its request pipe; one child at a time."""

    def __init__(self) -> None:
        log, self.log = tempfile.mkstemp(prefix="forked-cli-", suffix=".err")  # the server's own stderr
        # One OpenMP thread while torch loads: with OMP_NUM_THREADS unset (make test) its import starts a second
        # thread, which a fork would not copy. Each child's run sets its own thread count, as a fresh one does.
        env = {**cli_env(), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, __file__], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        os.close(log)
        self.busy, self.pending = False, b""
        ready = self.read(timeout=600)
        if ready.get("threads") != 1:  # a fork copies only the forking thread: others' locks could stay held
            raise RuntimeError(f"the fork server runs {ready.get('threads')} threads; it must run one")
        _log_cpu(ready["ready"], "forked CLI: server start")

    def read(self, timeout: float) -> dict[str, Any]:
        """The server's next reply line; TimeoutError after ``timeout`` s (unbuffered: ``select`` sees it all)."""
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise RuntimeError(f"the fork server ended: {Path(self.log).read_text()[-2000:]}")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return dict(json.loads(line))

    def send(self, request: dict[str, Any]) -> int:
        stdin: BinaryIO = self.proc.stdin  # type: ignore[assignment]
        stdin.write(json.dumps(request).encode() + b"\n")
        stdin.flush()
        self.busy = True
        return int(self.read(timeout=60)["pid"])

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.unlink(self.log)


_servers: list[_Server] = []
_turn = [0]


def _close_all() -> None:
    for server in _servers:
        server.close()


atexit.register(_close_all)


def _server() -> _Server:
    """The next idle server in turn (started on first use; another only while the others run a child)."""
    _servers[:] = [s for s in _servers if s.proc.poll() is None]
    k = _turn[0] % max(1, len(_servers))
    order = [*_servers[k:], *_servers[:k]] if len(_servers) >= SERVERS else []
    _turn[0] += 1
    for server in order:
        if not server.busy:
            return server
    _servers.append(_Server())
    return _servers[-1]


class Child:
    """A running ``python -m distillistic`` child: ``pid``, ``poll()``, ``wait()``, like ``subprocess.Popen``."""

    def __init__(self, argv: list[str], env: dict[str, str], script: str | None = None,
                 cwd: str | Path | None = None) -> None:
        self.args = [sys.executable, script, *argv] if script else [*COMMAND, *argv]
        cwd = str(cwd) if cwd is not None else os.getcwd()
        self.returncode: int | None = None
        self._folder = tempfile.mkdtemp(prefix="forked-cli-")
        if FRESH:
            with open(f"{self._folder}/out", "wb") as out, open(f"{self._folder}/err", "wb") as err:
                self._proc = subprocess.Popen(self.args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                              stderr=err, start_new_session=True)
            self.pid = self._proc.pid
            return
        self._server = _server()
        self.pid = self._server.send({"argv": argv, "env": env, "cwd": cwd, "script": script,
                                      "stdout": f"{self._folder}/out", "stderr": f"{self._folder}/err"})

    def _finish(self, reply: dict[str, Any]) -> None:
        self.returncode = os.waitstatus_to_exitcode(int(reply["status"]))  # -N: killed by signal N
        self._server.busy = False
        _log_cpu(float(reply["cpu"]), "forked CLI")

    def poll(self) -> int | None:
        """The exit code once the child has ended, else None (without waiting)."""
        if self.returncode is None:
            if FRESH:
                self.returncode = self._proc.poll()
                return self.returncode
            with contextlib.suppress(TimeoutError):
                self._finish(self._server.read(timeout=0))
        return self.returncode

    def wait(self, timeout: float = 400) -> subprocess.CompletedProcess[str]:
        """Wait for the child (SIGKILL to its session after ``timeout`` s); its exit code, stdout, stderr."""
        if self.returncode is None and FRESH:
            try:
                self.returncode = self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self._proc.wait()
                raise
        if self.returncode is None:
            try:
                self._finish(self._server.read(timeout=timeout))
            except TimeoutError:
                os.killpg(self.pid, signal.SIGKILL)
                self._finish(self._server.read(timeout=60))
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        assert self.returncode is not None
        out, err = (Path(self._folder, name) for name in ("out", "err"))
        result = subprocess.CompletedProcess(self.args, self.returncode, out.read_text(), err.read_text())
        out.unlink()
        err.unlink()
        os.rmdir(self._folder)
        return result


def cli_env(fault: str | None = None, **extra: str) -> dict[str, str]:
    """The test's environment for a child (``PYTHONPATH`` led by this checkout's ``src``, as for a fresh
    ``python -m distillistic``), ``$DISTILLISTIC_FAULT`` set to ``fault`` or unset, plus ``extra``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), **extra}
    env.pop("DISTILLISTIC_FAULT", None)
    if fault:
        env["DISTILLISTIC_FAULT"] = fault
    return env


def run(argv: list[str], fault: str | None = None, timeout: float = 400, env: dict[str, str] | None = None,
        script: str | None = None, cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m distillistic ARGV`` (or ``python SCRIPT ARGV``) in a forked child, in ``env`` (default: the
    test's, see :func:`cli_env`), with ``$DISTILLISTIC_FAULT`` set to ``fault`` or unset."""
    env = cli_env() if env is None else {**env}
    env.pop("DISTILLISTIC_FAULT", None)
    if fault:
        env["DISTILLISTIC_FAULT"] = fault
    return Child(argv, env, script, cwd=cwd).wait(timeout)


if __name__ == "__main__":
    _serve()
