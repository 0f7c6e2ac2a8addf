"""One worker of a tune: the studies in their storage, the budget shared by workers, the trials, the re-training.

:mod:`distillistic.experiments.tune` describes the whole; here is how a worker runs its share: it opens every
method's study (refusing one of another tune), then, per method, counts the trials that use the budget
(finished, pruned, running, or failed by their own config) and asks for a new one while fewer than N do
(counting and asking under a file lock on a SQLite storage, and checked again after asking on any other),
runs it (a heartbeat while it runs) and tells its value; a trial whose worker died is failed and replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillistic import config as config_mod
from distillistic.errors import UserError, short_repr
from distillistic.experiments import tune_space
from distillistic.experiments.grid import comparable, plain, read_by
from distillistic.experiments.sweep import SweepResult, run_sweep
from distillistic.fileio import pid_alive
from distillistic.runs.rundir import read_summary

log = logging.getLogger("distillistic")

DIRECTIONS = {"top1": "maximize", "nll": "minimize", "ece": "minimize"}
STORAGE_FILE = "tune.db"
HEARTBEAT_SECONDS, GRACE_SECONDS = 20, 120  # a trial whose worker is silent this long is failed and replaced


@dataclass
class TuneResult:
    out: Path
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> best, counts, space
    waiting: dict[str, int] = field(default_factory=dict)  # method -> its trials still running in other workers
    sweep: SweepResult | None = None  # the re-training (None: not run, --seeds 0 or trials still running)
    interrupted: bool = False


class TrialStopped(Exception):
    """A trial's run was stopped by a signal: the tune stops too (the trial is failed and will be re-run)."""


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UserError("tune needs Optuna: pip install 'distillistic[tune]' (or pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _counted(trial: Any, state: Any) -> bool:
    """Whether a trial uses the budget: finished, pruned, running, or failed by its own config (diverged)."""
    if trial.state in (state.COMPLETE, state.PRUNED, state.RUNNING, state.WAITING):
        return True
    return trial.state == state.FAIL and bool(trial.user_attrs.get("counted"))


def metric_value(metrics: Mapping[str, Any], objective: str) -> float | None:
    value = metrics.get(objective)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def epoch_value(rows: Sequence[Mapping[str, Any]], objective: str) -> float | None:
    """The objective on validation after one epoch: the mean over the students (a cohort's members)."""
    values = [metric_value(r, objective) for r in rows
              if r.get("split") == "val" and str(r.get("model", "")).startswith("student")]
    found = [v for v in values if v is not None]
    return sum(found) / len(found) if found and len(found) == len(values) else None


def final_value(summary: Mapping[str, Any], objective: str) -> float | None:
    """The objective of a finished run: its students' validation metrics at their best-on-val epoch (the
    checkpoint that is tested), averaged over the students."""
    models = summary.get("models")
    if not isinstance(models, dict):
        return None
    values = [metric_value(m.get("val_best") or {}, objective) for n, m in models.items()
              if n.startswith("student") and isinstance(m, dict)]
    found = [v for v in values if v is not None]
    return sum(found) / len(found) if found and len(found) == len(values) else None


class Tuner:
    """One worker of a tune: opens the studies, runs its share of every method's trials, then re-trains."""

    def __init__(self, algos: Sequence[str], trials: int, out: Path, base: Mapping[str, Any], storage: str | None,
                 objective: str, seeds: int, tune_epochs: int | None,
                 per_method: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.algos, self.trials, self.out, self.objective = list(algos), trials, out, objective
        self.base = {k: v for k, v in base.items() if k not in ("algo", "seed")}
        self.per_method = {m: dict(keys) for m, keys in (per_method or {}).items()}  # fixed for that method only
        self.cfg = config_mod.from_mapping(self.base)
        self.seed = int(base.get("seed", self.cfg.seed))
        self.seeds = [self.seed + k for k in range(1, seeds + 1)]
        self.tune_epochs = tune_epochs or self.cfg.epochs
        self.spaces = {m: tune_space.search_space(tune_space.method_spec(m), self.cfg.optimizer,
                                                  set(base) | set(self.per_method.get(m, {})))
                       for m in self.algos}
        self.optuna = _optuna()
        self.url = storage or f"sqlite:///{(out / STORAGE_FILE).resolve()}"
        self.storage: Any = None
        self.pinned: dict[str, dict[str, Any]] = {}  # method -> teacher_weights of the teachers trained first

    # --- the studies -------------------------------------------------------------------------------------

    def open(self) -> None:
        """Open the storage (``DIR/tune.db`` by default) and every method's study; refuse one of another tune."""
        if self.url == f"sqlite:///{(self.out / STORAGE_FILE).resolve()}":
            self.out.mkdir(parents=True, exist_ok=True)
        args = {"connect_args": {"timeout": 60}} if self.url.startswith("sqlite") else {}
        with self._ask_lock():  # two workers starting on a new SQLite file: one creates its tables
            try:
                self.storage = self.optuna.storages.RDBStorage(self.url, engine_kwargs=args,
                                                               heartbeat_interval=HEARTBEAT_SECONDS,
                                                               grace_period=GRACE_SECONDS)
            except Exception as e:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                reason = re.sub(r"^\([\w.]+\)\s*", "", reason)  # SQLAlchemy's "(sqlite3.OperationalError) ..."
                raise UserError(f"tune: --storage '{self.url}' cannot be opened ({reason})") from None
            for method in self.algos:
                self._check_settings(method)

    def fixed(self, method: str) -> dict[str, Any]:
        """The keys fixed for ``method``: the base keys it reads, then its own (``per_method``)."""
        return {**read_by(method, self.base), **self.per_method.get(method, {})}

    def check_methods(self) -> None:
        """Every method's config with its fixed keys, checked as a run checks its own before any study is opened:
        a key one method refuses (a cohort's size for ban, another teacher for tfkd_self) would otherwise stop
        the tune when that method's turn came, after the other methods' trials."""
        from distillistic.training import setup

        for method in self.algos:
            setup.resolve(config_mod.from_mapping({**self.fixed(method), "algo": method, "seed": self.seed}))

    def _settings(self, method: str) -> dict[str, Any]:
        base = comparable({**self.fixed(method), "seed": self.seed})
        record = {"base": base, "objective": self.objective, "tune_epochs": self.tune_epochs,
                  "space": tune_space.describe(self.spaces[method])}
        return dict(json.loads(json.dumps(record, default=str)))

    def _check_settings(self, method: str) -> None:
        study = self.study(method)
        want, have = self._settings(method), study.user_attrs.get("tune")
        if have is None:
            study.set_user_attr("tune", want)
            return
        for part in ("objective", "tune_epochs", "space", "base"):
            if have.get(part) != want[part]:
                a, b = have.get(part), want[part]
                if isinstance(a, dict) and isinstance(b, dict):
                    key = next(k for k in sorted({*a, *b}) if a.get(k) != b.get(k))
                    part, a, b = f"{part} key '{key}'", a.get(key), b.get(key)
                raise UserError(f"tune: the study '{method}' in {self.url} is of another tune ({part}: "
                                f"{short_repr(a)} there, {short_repr(b)} now); restore those settings, or choose "
                                "another --out or --storage")

    def study(self, method: str, sampler_seed: int | None = None) -> Any:
        optuna = self.optuna
        startup = max(2, min(10, self.trials // 3))  # random draws (and unpruned trials) before TPE's model
        sampler = optuna.samplers.TPESampler(seed=self.seed if sampler_seed is None else sampler_seed,
                                             n_startup_trials=startup)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0)
        return optuna.create_study(storage=self.storage, study_name=method, direction=DIRECTIONS[self.objective],
                                   sampler=sampler, pruner=pruner, load_if_exists=True)

    @contextlib.contextmanager
    def _ask_lock(self) -> Iterator[None]:
        """Between two workers on one SQLite file: counting the budget and asking a trial, one at a time."""
        path = self.url.removeprefix("sqlite:///") if self.url.startswith("sqlite:///") else ""
        if not path or path == ":memory:":
            yield
            return
        try:
            handle = open(path + ".lock", "a")  # noqa: SIM115 (closed below)
        except OSError:  # no folder for it: opening the database itself says why
            yield
            return
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _reap(self, study: Any) -> None:
        """Fail the trials whose worker is gone: silent past the grace period, or a dead process on this machine."""
        optuna = self.optuna
        optuna.storages.fail_stale_trials(study)
        host = socket.gethostname()
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            where, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
            if where == host and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
                log.info("%s: trial %d was lost with its worker (pid %s); another trial takes its place",
                         study.study_name, t.number, pid)
                shutil.rmtree(self._folder(study.study_name, t.number), ignore_errors=True)

    def _folder(self, method: str, number: int) -> Path:
        return self.out / ".trials" / method / f"trial-{number:04d}"

    def pin_teachers(self, method: str) -> None:
        """Train (or find in the cache) once, with the fixed settings, the teachers the method's runs would train
        first, and name them by path: a teacher trained first reads the run's lr and weight decay, so each
        trial's draw (and each method's best) would otherwise train and distil from a teacher of its own."""
        from distillistic.data.loader import build_data
        from distillistic.teachers.cache import trained_teacher_dir
        from distillistic.teachers.roster import teacher_configs
        from distillistic.training import setup
        from distillistic.training.run import train

        if not tune_space.method_spec(method).needs_teacher:
            return
        values = {**self.fixed(method), "algo": method, "seed": self.seed, "progress": False}
        cfg = setup.resolve(config_mod.from_mapping(values))
        configs = teacher_configs(cfg)
        weights = [w for c in configs for w in c.teacher_weights]  # one entry each (teacher_configs)
        if "train" not in weights:
            return
        info = build_data(cfg).info
        paths = [str(trained_teacher_dir(c, info, train)) if w == "train" else w for c, w in zip(configs, weights)]
        self.pinned[method] = {"teacher_weights": paths[0] if len(paths) == 1 else paths}

    # --- the trials ---------------------------------------------------------------------------------------

    def tune_method(self, method: str) -> int:
        """Run trials of ``method`` while its budget lasts; the number still running in other workers."""
        state = self.optuna.trial.TrialState
        while True:
            self._reap(self.study(method))
            with self._ask_lock():
                trials = self.study(method).get_trials(deepcopy=False)
                if sum(_counted(t, state) for t in trials) >= self.trials:
                    return sum(t.state == state.RUNNING for t in trials)
                study = self.study(method, sampler_seed=self.seed + len(trials))  # reproducible per trial
                with warnings.catch_warnings():  # Optuna's heartbeat, beaten here by _Heartbeat (not optimize's)
                    warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
                    trial = study.ask()
                trial.set_user_attr("worker", _worker())
                self.storage.record_heartbeat(self._trial_id(method, trial.number))
            earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and _counted(t, state)]
            if len(earlier) >= self.trials:  # another worker took the budget meanwhile (a server database)
                trial.set_user_attr("surplus", True)
                study.tell(trial, state=state.FAIL)
                continue
            self._run_trial(study, method, trial)

    def _trial_id(self, method: str, number: int) -> int:
        study_id = self.storage.get_study_id_from_name(method)
        return int(self.storage.get_trial_id_from_study_id_trial_number(study_id, number))

    def _trial_config(self, method: str, params: Mapping[str, Any], folder: Path) -> Any:
        values = {**self.fixed(method), "algo": method, "seed": self.seed, **self.pinned.get(method, {}),
                  **params,
                  "epochs": self.tune_epochs, "out": str(folder), "overwrite": True, "quiet": True,
                  "progress": False, "tensorboard": False, "wandb": False}
        return config_mod.from_mapping(values)

    def _listener(self, trial: Any, folder: Path) -> Any:
        def listener(cfg: Any, epoch: int, rows: list[dict[str, Any]]) -> None:
            if Path(cfg.out or "").resolve() != folder.resolve():  # a teacher trained first, a generation
                return
            value = epoch_value(rows, self.objective)
            if value is None:
                return
            trial.report(value, epoch)
            if epoch < cfg.epochs and trial.should_prune():
                raise self.optuna.TrialPruned(f"pruned after epoch {epoch} ({self.objective} {value:.4f})")
        return listener

    def _run_trial(self, study: Any, method: str, trial: Any) -> None:
        from distillistic.training.listeners import on_epoch
        from distillistic.training.run import train

        state = self.optuna.trial.TrialState
        params = tune_space.suggest(trial, self.spaces[method])
        folder = self._folder(method, trial.number)
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        log.info("%s trial %d: %s", method, trial.number, shown)
        start = time.perf_counter()
        try:
            beat = _Heartbeat(self.storage, self._trial_id(method, trial.number))
            with on_epoch(self._listener(trial, folder)), beat:
                result = train(self._trial_config(method, params, folder))
        except self.optuna.TrialPruned as e:
            study.tell(trial, state=state.PRUNED)
            log.info("%s trial %d: %s, %.0f s", method, trial.number, e, time.perf_counter() - start)
            return
        except UserError as e:
            if read_summary(folder).get("status") != "diverged":  # bad input: it would fail every trial
                study.tell(trial, state=state.FAIL)
                raise
            self._fail_counted(study, trial, f"diverged: {e}")
            return
        except BaseException:
            study.tell(trial, state=state.FAIL)  # not counted: a worker that runs again re-draws it
            raise
        finally:  # the trial's summary and metric rows stay (DIR/.trials is hidden from the report)
            for checkpoints in folder.glob("**/checkpoints"):  # a born-again run's generations have theirs
                shutil.rmtree(checkpoints, ignore_errors=True)
        if result.summary.get("status") == "interrupted":
            study.tell(trial, state=state.FAIL)
            raise TrialStopped(str(result.summary.get("reason") or "stopped by a signal"))
        value = final_value(result.summary, self.objective)
        if value is None:
            self._fail_counted(study, trial, f"no finite validation {self.objective}")
            return
        study.tell(trial, value)
        log.info("%s trial %d: val %s %.4f, %.0f s", method, trial.number, self.objective, value,
                 time.perf_counter() - start)

    def _fail_counted(self, study: Any, trial: Any, reason: str) -> None:
        """A trial its own config spoiled (it diverged): failed, and it used its share of the budget."""
        trial.set_user_attr("counted", True)
        trial.set_user_attr("reason", reason[:500])
        study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
        log.warning("%s trial %d: %s", study.study_name, trial.number, reason)

    # --- the outcome ------------------------------------------------------------------------------------

    def best(self, method: str) -> dict[str, Any]:
        """The method's trials by state, its best trial (value, params) and its space."""
        study = self.study(method)
        trials = study.get_trials(deepcopy=False)
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
        done = [t for t in trials if t.state == self.optuna.trial.TrialState.COMPLETE]
        entry: dict[str, Any] = {"trials": counts, "space": tune_space.describe(self.spaces[method])}
        if done:
            top = study.best_trial
            entry |= {"best_trial": top.number, "best_value": top.value, "best_params": dict(top.params)}
        return entry

    def retrain(self, methods: Mapping[str, Mapping[str, Any]]) -> SweepResult:
        """Each method's best configuration on the same seeds, a sweep in ``DIR`` (resumable as one)."""
        return run_sweep(self.sweep_spec({m: e["best_params"] for m, e in methods.items()}), self.out)

    def sweep_spec(self, params: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        variants = {m: {"algo": m, **self.per_method.get(m, {}), **self.pinned.get(m, {}),
                        **{k: plain(v) for k, v in p.items()}}
                    for m, p in params.items()}
        return {**self.base, "variants": variants, "grid": {"seed": self.seeds or [self.seed + 1]}}


class _Heartbeat:
    """Records a trial's heartbeat every few seconds while it runs (Optuna fails silent trials)."""

    def __init__(self, storage: Any, trial_id: int) -> None:
        self.storage, self.trial_id, self.stop = storage, trial_id, threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            self.storage.record_heartbeat(self.trial_id)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
