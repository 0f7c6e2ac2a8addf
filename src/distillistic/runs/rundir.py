"""The run directory: config, manifest, metrics, TensorBoard events, checkpoints and summary.

Layout of ``DIR``::

    config.yaml          the resolved config (every key)
    manifest.json        versions, git sha, host, dataset checksum, seeds, start/end times
    metrics.jsonl        one JSON object per epoch per model per split
    summary.json         test metrics at the best-on-val and last epochs, for every model
    tensorboard/         TensorBoard events
    checkpoints/last.pt  everything needed to resume exactly (written every epoch / K steps)
    checkpoints/best-<model>.pt   each student's best-on-val weights
    export/<model>.safetensors    written by ``distillistic export`` (weights + arch, classes, config)

Only rank 0 writes. At the end of an epoch the best weights are written before ``last.pt`` and the
rows after it; ``metrics.jsonl`` is rewritten from the checkpoint's history on resume, so a crash at
any point leaves files that agree with the checkpoint a resume starts from.

``last.pt`` holds everything a resume needs to continue *exactly* (tested bit for bit by
``tests/test_resume.py``): every student's weights, optimiser, schedule and the grad scaler; the
Python, NumPy, torch and CUDA RNG states; the position in the data (epoch and step: the sample order
and every augmentation are pure functions of ``(data_seed, epoch, index)``, so nothing else is
needed); the partial epoch's training sums; the best-on-val record and the metrics history; the
config; and the teacher's identity (architecture, source and a hash of its weights), so a resume
with another teacher is refused.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from distillistic import config as config_mod
from distillistic.config import Config
from distillistic.data.loader import DataInfo
from distillistic.errors import TrainingDiverged, UserError, shown
from distillistic.locks import holder_of, how_to_break, note_holder, try_lock
from distillistic.runs.summary import build_summary, clean
from distillistic.training.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    fault_point,
    remove_stale_temporaries,
    save,
    state_dict_hash,
)
from distillistic.training.engine import Progress, Task, TrainMeters
from distillistic.training.runtime import Runtime, rng_state

log = logging.getLogger("distillistic")
RUN_FILES = ("config.yaml", "manifest.json", "metrics.jsonl", "summary.json", "checkpoints", "tensorboard", "export",
             "calibration.json")


def _version(package: str = "distillistic") -> str:
    """An installed package's version, from its metadata (torchvision's too: a run that uses none of it never
    imports it, about 0.4 s of CPU of each process's start)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _git() -> dict[str, Any] | None:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return None
    return {"sha": sha, "dirty": dirty}


def read_summary(folder: Path) -> dict[str, Any]:
    """A run directory's ``summary.json``, or ``{}`` if it has none yet or it cannot be read."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_STOP_SIGNALS: list[int] = []  # the signals that stopped a run in this process, first first


def note_stop_signal(signum: int) -> None:
    """Record a SIGINT/SIGTERM that stops a run (or the teacher trained first inside it)."""
    _STOP_SIGNALS.append(signum)


def stop_exit_code(clear: bool = False) -> int:
    """128 + the first signal that stopped a run in this process (130 for Ctrl-C, 143 for SIGTERM); 130 when
    none was recorded (a KeyboardInterrupt). ``clear`` forgets them (before a new run)."""
    code = 128 + _STOP_SIGNALS[0] if _STOP_SIGNALS else 130
    if clear:
        _STOP_SIGNALS.clear()
    return code


class RunDir:
    """Files of one run; also the engine's :class:`~distillistic.training.engine.Hooks`."""

    def __init__(self, out: Path, cfg: Config, rt: Runtime) -> None:
        self.out, self.cfg, self.rt = out, cfg, rt
        self.stop_requested = False
        self.stop_signal: int | None = None  # the first SIGINT/SIGTERM received: the CLI exits 128 + it
        self.teacher: dict[str, Any] | None = None  # identity of the frozen teacher, saved in last.pt
        self._tb: Any = None
        self._wandb: Any = None
        self.manifest: dict[str, Any] = {}
        self.data_checksum: str | None = None  # the dataset's checksum, saved in last.pt, checked on resume
        self._lock: Any = None  # the open lock file while this run holds the directory

    @property
    def last_checkpoint(self) -> Path:
        return self.out / "checkpoints" / "last.pt"

    def best_path(self, name: str) -> Path:
        return self.out / "checkpoints" / f"best-{name}.pt"

    def has_checkpoint(self) -> bool:
        return self.last_checkpoint.is_file()

    def check(self) -> None:
        """Refuse an output path that is a file, or a directory holding another run (unless asked)."""
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out '{self.out}' is a file; choose a directory path")
        if self.out.is_symlink() and not self.out.exists():
            raise UserError(f"--out '{self.out}' is a symlink to '{os.readlink(self.out)}', which does not exist; "
                            "create its target or choose another path")
        parent = next(p for p in [self.out, *self.out.absolute().parents] if p.exists())
        if not parent.is_dir():
            raise UserError(f"--out '{self.out}' cannot be created: '{parent}' is a file; choose another path")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"--out '{self.out}' cannot be written: no write permission in '{parent}'; "
                            "choose another path")
        if self.cfg.resume and not self.out.exists():
            raise UserError(f"--resume: '{self.out}' does not exist; check the path, or drop --resume to start "
                            "a new run there")
        if self.out.is_dir():
            self.lock()
        occupied = self.out.is_dir() and any((self.out / f).exists() for f in RUN_FILES)
        if not occupied:
            return
        if self.cfg.resume:
            if not self.has_checkpoint():
                raise UserError(f"--resume: '{self.out}' holds no checkpoints/last.pt to resume from; "
                                "drop --resume, or pass --overwrite to start it again")
            return
        if not self.cfg.overwrite:
            raise UserError(f"'{self.out}' already holds a run; pass --resume to continue it, --overwrite to "
                            "replace it, or choose another --out")

    def lock(self) -> None:
        """Hold ``DIR/.lock`` (an fcntl lock, released when the process ends, even killed): a second run on
        the same directory at the same time is refused, whatever its flags."""
        if not self.rt.is_main or self._lock is not None:
            return
        path = self.out / ".lock"
        f = path.open("a")
        if not try_lock(f, note=False):  # noted when the run writes its files (open)
            f.close()
            holder, pid = holder_of(path)
            raise UserError(f"'{self.out}' is in use by another run: {holder} holds {path}; wait for that run "
                            f"to end or choose another --out; {how_to_break(pid)}")
        self._lock = f

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    def open(self, info: DataInfo, task: Task, progress: Progress) -> None:
        """Create the directory's files; on resume, rewrite ``metrics.jsonl`` from the checkpoint's history."""
        resumed = progress.global_step > 0
        if not self.rt.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock()
        note_holder(self._lock)  # who holds it, for a run that waits or is refused
        if self.cfg.overwrite and not resumed:
            for name in RUN_FILES:
                path = self.out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)
        for folder in (self.out, self.out / "checkpoints"):  # left by a writer killed before its rename
            for tmp in remove_stale_temporaries(folder):
                log.info("removed %s, an unfinished write of a process that was stopped", shown(tmp))
        config_mod.save(self.cfg, self.out / "config.yaml")
        previous = self._read_manifest() if resumed else {}
        self.manifest = {
            "distillistic": _version(), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": _version("torchvision"), "git": _git(), "host": platform.node(),
            "platform": platform.platform(),
            "command": sys.argv, "device": str(self.rt.device), "precision": self.rt.precision,
            "world_size": self.rt.world_size, "seed": self.cfg.seed, "data_seed": self.cfg.data_seed,
            "dataset": {"name": info.dataset, "root": info.root, "checksum": info.checksum, "sizes": info.sizes,
                        "num_classes": info.num_classes, "image_size": info.image_size,
                        "channels": info.channels, "mean": info.mean, "std": info.std,  # to normalise inputs later
                        "class_names": list(info.class_names), "source": task.loaders["test"].describe()["source"]},
            "objective": str(task.objective),
            "start_time": previous.get("start_time", _now()), "end_time": None,
            "resumed_at": [*previous.get("resumed_at", []), *([_now()] if resumed else [])],
        }
        atomic_write_json(self.out / "manifest.json", self.manifest)
        history = progress.history if resumed else []
        atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(clean(r)) + "\n" for r in history))
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out / "tensorboard"))
        if self.cfg.wandb:
            import wandb  # only imported when asked for; honours WANDB_MODE=offline

            self._wandb = wandb.init(project="distillistic", name=self.out.name, dir=str(self.out),
                                     config=self.cfg.to_dict(), resume="allow")

    def note(self, key: str, value: Any) -> None:
        """Add ``key: value`` to ``manifest.json`` (rank 0), e.g. how the teacher's outputs are obtained."""
        self.manifest[key] = value
        if self.rt.is_main:
            atomic_write_json(self.out / "manifest.json", self.manifest)

    def _read_manifest(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.out / "manifest.json").read_text()))
        except (OSError, ValueError):
            return {}

    # --- engine hooks --------------------------------------------------------------------------------

    def request_stop(self, signum: int, frame: Any) -> None:
        """SIGINT/SIGTERM handler: stop after the current step; a second signal stops at once."""
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True  # first: another handler (e.g. the DataLoader's SIGCHLD) may run inside log
        self.stop_signal = signum
        note_stop_signal(signum)
        if hasattr(signal, "SIGCHLD"):
            # A signal sent to the whole group also ends the data-loading workers. PyTorch's SIGCHLD handler
            # would raise at once, in the middle of the step; without it the loader reports their end at the
            # next fetch, which a stopping run does not make (and the caller handles if it was waiting in one).
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        log.warning("%s: finishing the current step, then writing a checkpoint (again to stop at once)",
                    signal.Signals(signum).name)

    def after_step(self, task: Task, progress: Progress, meters: TrainMeters) -> bool:
        fault_point("step")
        stop = self.stop_requested
        if self.rt.distributed:
            # Ranks must stop at the same step (checkpointing is collective): agree at sync points only.
            stop = False
            if progress.step % self.cfg.log_every == 0:
                flag = torch.tensor([float(self.stop_requested)], device=self.rt.device)
                self.rt.all_reduce_([flag])
                stop = bool(flag.item() > 0)
        every = self.cfg.checkpoint_every
        if stop or (every and progress.global_step % every == 0):
            meters.check_finite(f"epoch {progress.epoch + 1}, step {progress.step}", self.rt)
            self.save_last(task, progress, meters)
        return stop

    def after_epoch(self, task: Task, progress: Progress, rows: list[dict[str, Any]], improved: list[str]) -> None:
        if self.rt.is_main:
            for s in [*task.students, *task.members]:
                if s.name in improved:
                    self.save_best(task, progress, s.name, s.raw.state_dict())
        fault_point("after-best")
        self.save_last(task, progress)
        fault_point("after-last")
        if self.rt.is_main:
            with (self.out / "metrics.jsonl").open("a") as f:
                f.writelines(json.dumps(clean(r)) + "\n" for r in rows)
            self._log_scalars(rows)

    def save_best(self, task: Task, progress: Progress, name: str, state: dict[str, Any]) -> None:
        """Write ``best-<name>.pt`` (weights of ``progress.best[name]``'s epoch); ``last.pt`` records the sha256
        of its weights, so that a resume knows the file is this run's."""
        progress.best_files[name] = state_dict_hash(state)
        save({
            "kind": "best", "config": self.cfg.to_dict(), "arch": {name: _archs(task)[name]},
            "num_classes": task.num_classes, "epoch": progress.best[name]["epoch"], "models": {name: state}},
            self.best_path(name))

    def _log_scalars(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            values = {k: v for k, v in row.items() if isinstance(v, int | float) and k != "epoch"}
            if self._tb is not None:
                for key, value in values.items():
                    self._tb.add_scalar(f"{row['split']}/{key}/{row['model']}", value, row["epoch"])
            if self._wandb is not None:
                self._wandb.log({f"{row['split']}/{k}/{row['model']}": v for k, v in values.items()}
                                | {"epoch": row["epoch"]})
        if self._tb is not None:
            self._tb.flush()

    def log_step(self, step: int, values: dict[str, float]) -> None:
        """Per-step scalars (``train_step/<key>``) at the progress-line interval."""
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"train_step/{key}", value, step)

    def save_last(self, task: Task, progress: Progress, meters: TrainMeters | None = None) -> None:
        """Everything needed to continue exactly: models, optimisers, schedules, scaler, RNG, progress.

        Raises :class:`TrainingDiverged` instead of writing weights that are no longer finite, so the
        previous ``last.pt`` stays the last good one.
        """
        # Every rank checks (their weights are equal), so that all of them stop together.
        params = [p.detach() for s in task.students for p in s.raw.parameters()]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise TrainingDiverged(f"the weights became NaN or inf (epoch {progress.epoch + 1}, "
                                   f"step {progress.step})")
        # The partial epoch's training sums of every rank (a resume restores them on rank 0 alone).
        sums = [t.clone() for t in meters.tensors()] if meters is not None else None
        self.rt.all_reduce_(sums or [])
        if not self.rt.is_main:
            return
        state = {k: getattr(progress, k) for k in ("epoch", "step", "global_step", "best", "history",
                                                   "train_seconds", "train_images", "epoch_seconds",
                                                   "epoch_images", "teacher_flops", "best_files")}
        evaluated = [*task.students, *task.members]  # members (EMA copies) too, for export; restored via "terms"
        save({"kind": "last", "config": self.cfg.to_dict(), "arch": _archs(task),
              "num_classes": task.num_classes, "models": {s.name: s.raw.state_dict() for s in evaluated},
              "optimizers": [o.state_dict() for o in task.optimizers],
              "schedulers": [s.state_dict() for s in task.schedulers], "scaler": self.rt.scaler.state_dict(),
              "rng": rng_state(), "progress": state, "teacher": self.teacher, "terms": task.objective.state_dict(),
              "data_checksum": self.data_checksum, "machine": machine_facts(self.rt),
              "meters": [t.cpu() for t in sums] if sums is not None else None},
             self.last_checkpoint)

    # --- summary -------------------------------------------------------------------------------------

    def write_summary(self, task: Task, progress: Progress, status: str, reason: str | None = None,
                      final: dict[str, dict[str, Any]] | None = None,
                      teacher_source: str | list[str] | None = None,
                      costs: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """Write ``summary.json`` (rank 0) and stamp the manifest's end time; return the summary."""
        summary = build_summary(task, progress, status, reason, final, teacher_source, costs)
        if self.manifest.get("dataset", {}).get("class_names"):  # what each output of the models means
            summary["class_names"] = self.manifest["dataset"]["class_names"]
        if self.rt.is_main:
            atomic_write_json(self.out / "summary.json", summary)
            if self.manifest:
                self.manifest["end_time"] = _now()
                atomic_write_json(self.out / "manifest.json", self.manifest)
        return summary

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def machine_facts(rt: Runtime) -> dict[str, Any]:
    """What a run computes on (saved in ``last.pt``): a resume elsewhere continues, but not bit for bit."""
    return {"device": str(rt.device), "threads": torch.get_num_threads()}


def _archs(task: Task) -> dict[str, str]:
    """Each student's architecture (a mixed cohort lists them in ``students``), and each member's (its student's)."""
    names = [s.name for s in task.students]
    archs = dict(zip(names, config_mod.student_archs(task.cfg, len(names))))
    return archs | {m.name: archs[m.follows or ""] for m in task.members}

