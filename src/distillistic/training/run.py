"""A run: config -> data, models, signals, objective -> the engine -> a run directory.

``train(cfg)`` is the Python API behind ``distillistic train``. Everything that can fail because of
the user's input (config, data, teacher weights, output directory) fails before anything is written.
"""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillistic import config as config_mod
from distillistic.config import Config, cache_dir
from distillistic.data.datasets import FileSource
from distillistic.data.loader import DataInfo, EpochSampler, Loader, build_data, resident
from distillistic.data.mix import MIX_LIVE, batch_mix
from distillistic.data.views import ViewMaker
from distillistic.errors import TeacherStopped, TrainingDiverged, UserError, shown
from distillistic.methods.registry import METHODS, Context, student_count
from distillistic.models.builders import MODELS, build_model, check_fits
from distillistic.runs.interrupts import interrupt_on_sigterm
from distillistic.runs.result import RunResult, api_voice
from distillistic.runs.resume import check_best_files, restore_state
from distillistic.runs.rundir import RunDir
from distillistic.runs.talk import Talk, say, start_line
from distillistic.teachers.calibration import derive_settings
from distillistic.teachers.check import check_teacher
from distillistic.teachers.costs import teacher_training_cost
from distillistic.teachers.roster import TeacherSet
from distillistic.training import setup
from distillistic.training.checkpoint import fault_point, load_model_weights, read_state_dict, unwrap
from distillistic.training.costs import measure_training, model_costs, peak_memory
from distillistic.training.engine import Member, Progress, Task, evaluate, evaluate_all, fit
from distillistic.training.features import TEACHER_LIVE, ModelProbe, attach_taps_for
from distillistic.training.lines import prefix
from distillistic.training.optim import make_optimizer, make_scheduler
from distillistic.training.ranks import agree
from distillistic.training.runtime import Runtime, derived_seed, resolve_runtime, seed_everything, stop_every_rank
from distillistic.training.small_data import small_data_warnings

log = logging.getLogger("distillistic")


def train(config: Config | None = None, /, **overrides: Any) -> RunResult:
    """Train and evaluate one run; keyword overrides are config keys (``train(algo="kd", epochs=3)``)."""
    api_voice()  # from Python, the same lines as the CLI's (through logging)
    try:  # --virtual-p-from: p from a baseline run, saved in config.yaml
        cfg = derive_settings(setup.resolve(config_mod.from_mapping(overrides, base=config or Config())), train)
        setup.check_given(cfg, overrides)
        if not cfg.out:
            raise UserError("no output directory: pass --out DIR")
    except UserError as e:
        stop_every_rank(e)  # under torchrun: every rank stops with this rank's line, none waits for it
        raise
    rt = resolve_runtime(cfg)
    level = log.level
    if cfg.quiet:  # as the CLI's --quiet: only warnings and errors
        log.setLevel(logging.WARNING)
    try:
        if METHODS.get(cfg.algo).generations is not None:  # born-again: one run directory per generation
            from distillistic.training.generations import train_generations

            return RunResult(Path(cfg.out), cfg, train_generations(cfg, rt, _run, build_task))
        return _run(cfg, rt)
    finally:
        log.setLevel(level)
        rt.close()


def _student_names(n: int) -> list[str]:
    return ["student"] if n == 1 else [f"student{i}" for i in range(n)]


def _build_students(cfg: Config, info: Any) -> list[nn.Module]:
    count = student_count(cfg)
    assert count is not None
    models = []
    for i, arch in enumerate(config_mod.student_archs(cfg, count)):  # a mixed cohort: each member its own arch
        torch.manual_seed(derived_seed(cfg.seed, "student", i))  # each member its own, reproducible init
        model = build_model(arch, info.num_classes, info.channels, cfg.student_resolution or info.image_size,
                            imagenet=cfg.student_weights == "imagenet", freeze_backbone=cfg.freeze_backbone)
        if cfg.student_weights not in ("random", "imagenet"):
            load_model_weights(model, Path(cfg.student_weights).expanduser(), arch, "student", "--model",
                               "random, imagenet")
        models.append(model)
    return models


def _check_models_fit(cfg: Config, info: Any) -> None:
    """Every student and teacher reads its input size and fits in memory: refused before anything is built."""
    count = student_count(cfg) or 1
    for arch in dict.fromkeys(config_mod.student_archs(cfg, count)):
        check_fits(arch, info.num_classes, info.channels, cfg.student_resolution or info.image_size, "student")
    if METHODS.get(cfg.algo).needs_teacher:
        for arch in dict.fromkeys(cfg.teacher or ()):
            check_fits(arch, info.num_classes, info.channels, cfg.teacher_resolution or info.image_size, "teacher")


def _wrap(model: nn.Module, cfg: Config, rt: Runtime) -> nn.Module:
    model = model.to(rt.device, rt.dtype)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if rt.distributed:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        # a module some of whose parameters never reach the loss (SimKD's student: its own head) says so
        unused = bool(getattr(model, "ddp_find_unused_parameters", False))
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)
    if cfg.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    return model


@dataclass(frozen=True)
class Assembly:
    """What building a task found besides the task: the data's facts and the frozen teachers (if any)."""

    data: DataInfo
    teachers: TeacherSet | None = None
    teacher_outputs: str | None = None  # why the teacher store is off, when it is

    @property
    def teacher_source(self) -> str | list[str] | None:
        return self.teachers.source if self.teachers else None


def _loaders(cfg: Config, rt: Runtime, bundle: Any, views: int) -> dict[str, Loader]:
    """The train loader (seeded epoch order, ``views`` augmented views per sample) and the val/test loaders."""
    assert cfg.data_seed is not None
    assert cfg.eval_batch_size is not None
    info, pin = bundle.info, rt.device.type == "cuda"
    imbalance = (cfg.imbalance_class, cfg.imbalance_share) if cfg.imbalance_class is not None else None
    train_split = bundle.splits["train"]
    loaders = {"train": Loader(resident(train_split, rt.device), EpochSampler(
        train_split.labels, cfg.batch_size // rt.world_size, cfg.data_seed, True, rt.rank, rt.world_size, imbalance),
        info.image_size, True, cfg.data_seed, cfg.num_workers, pin, views=views)}
    for split in ("val", "test"):
        sampler = EpochSampler(bundle.splits[split].labels, max(1, cfg.eval_batch_size // rt.world_size),
                               cfg.data_seed, False, rt.rank, rt.world_size)
        loaders[split] = Loader(resident(bundle.splits[split], rt.device), sampler, info.image_size, False,
                                cfg.data_seed, cfg.num_workers, pin)
    return loaders


def _prepare_teachers(task: Task, teachers: TeacherSet, bundle: Any) -> str | None:
    """Calibrate the teachers (before the stores: T_cal is in their keys) and open their output stores; the
    reason the store is off when the teacher must run live (tapped by a feature method, or reading mixed images)."""
    cfg, rt = task.cfg, task.rt
    if cfg.teacher_calibration == "temperature":
        from distillistic.teachers.calibration import calibrate_teachers

        task.teacher_temperatures = calibrate_teachers(teachers.signals, [m.name for m in teachers.members],
                                                       task.loaders["val"], task.views, bundle.info.num_classes, rt)
    live = TEACHER_LIVE if any(s.taps is not None for s in teachers.signals) else None
    if live or cfg.mix != "none":
        log.info("teacher store: off (%s)", live := live or MIX_LIVE)
        return live
    teachers.open_stores(bundle, task.loaders, task.views, rt)
    return None


def build_task(cfg: Config, rt: Runtime) -> tuple[Task, Assembly]:
    """Everything the engine needs, from a resolved config; raises :class:`UserError` on bad input."""
    try:
        bundle = build_data(cfg)
    except UserError as e:
        agree("copy of the data", None, e)  # under torchrun: every rank stops with this rank's line, none waits
        raise
    agree("copy of the data", bundle.info.checksum)  # every rank reads rank 0's data
    info = bundle.info
    setup.check_for_data(cfg, info.num_classes, info.image_size, files=isinstance(bundle.splits["train"], FileSource))
    _check_models_fit(cfg, info)
    method = METHODS.get(cfg.algo)
    seed_everything(cfg.seed)
    teachers = None
    if method.needs_teacher:  # one teacher or several, each with its own identity (teachers/roster.py)
        from distillistic.teachers.roster import build_teachers

        teachers = build_teachers(cfg, info, rt, train)
    n_students = student_count(cfg) or 1
    names = _student_names(n_students)
    archs = config_mod.student_archs(cfg, n_students)
    raw_students = _build_students(cfg, info)
    first = teachers.signals[0] if teachers else None  # feature methods tap one teacher
    # Terms may shape adapters from the models (a dry forward) and tap their stages (hooks on the plain modules).
    probe = ModelProbe(cfg, info, raw_students, first.model if first else None, len(bundle.splits["train"].labels))
    objective = method.objective(cfg, Context(teachers.signal if teachers else None, info.num_classes,
                                              n_students, probe)).to(rt.device)
    if rt.dtype == torch.float64:  # fp64: a term's own parameters too (other precisions keep their dtypes)
        objective = objective.to(rt.dtype)
    taps = attach_taps_for(cfg, objective, raw_students, first)
    raw_students = [objective.student_model(i, m) for i, m in enumerate(raw_students)]  # a method's own head
    students = [Member(n, _wrap(m, cfg, rt), cfg.student_resolution, MODELS.get(a).channels(info.channels),
                       norm=MODELS.get(a).norm, taps=tap) for n, m, a, tap in zip(names, raw_students, archs, taps)]
    objective.bind([s.raw for s in students], [(s.view_size, s.channels, s.norm) for s in students])
    members = [Member(f"{students[i].name}_{suffix}", model, students[i].view_size, students[i].channels,
                      norm=students[i].norm, follows=students[i].name)
               for i, suffix, model in objective.members()]  # EMA copies: evaluated and exported like students
    assert cfg.data_seed is not None
    assert cfg.augment is not None
    views = n_students if cfg.peer_views == "independent" else 1  # training views per sample
    loaders = _loaders(cfg, rt, bundle, views)
    if rt.is_main and not prefix():  # once per run (not again for the teacher trained first inside it)
        small_data_warnings(cfg, len(loaders["train"]), len(bundle.splits["train"]), bundle.splits["val"].labels,
                            info.num_classes, isinstance(bundle.splits["train"], FileSource))
    total_steps = len(loaders["train"]) * cfg.epochs
    # A term's own parameters (an adapter, a temperature) train with the student they belong to.
    make = method.optimizer or make_optimizer  # a method that is an optimizer (DOT) brings its own
    optimizers = [make(cfg, [*s.model.parameters(), *objective.student_parameters(i)]) for i, s in enumerate(students)]
    schedulers = [make_scheduler(cfg, opt, total_steps) for opt in optimizers]
    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    task = Task(cfg, rt, students, optimizers, schedulers, objective, teachers.members[0] if teachers else None,
                loaders,
                ViewMaker(info, cfg.augment, cfg.data_seed, rt.device, cfg.channels_last, dtype=rt.dtype, views=views,
                          strong=objective.strong_view, mix=batch_mix(cfg, info.num_classes)),
                info.num_classes,
                show_progress=show and rt.is_main, per_class=cfg.imbalance_class is not None,
                teachers=teachers.members if teachers else [], members=members)
    outputs = _prepare_teachers(task, teachers, bundle) if teachers is not None else None
    return task, Assembly(info, teachers, outputs)


def _run(cfg: Config, rt: Runtime) -> RunResult:
    rundir = RunDir(Path(cfg.out or ""), cfg, rt)
    try:
        return _run_in(rundir, cfg, rt)
    finally:
        rundir.unlock()  # the run directory's lock (taken by check or open)


def _run_in(rundir: RunDir, cfg: Config, rt: Runtime) -> RunResult:
    out = rundir.out
    rundir.check()  # refuse an occupied DIR (or one another run holds) before any work
    try:
        with interrupt_on_sigterm():  # before training: a SIGTERM stops as a Ctrl-C does (exit 130)
            task, extra = build_task(cfg, rt)
    except TeacherStopped as e:  # nothing is distilled from a teacher that is not complete
        rundir.close()
        return RunResult(out, cfg, {"status": "interrupted", "stage": "teacher", "reason": str(e)})
    info = extra.data
    rundir.data_checksum = info.checksum
    if task.teacher is not None:  # its identity goes into every checkpoint: a resume must use the same one
        assert extra.teachers is not None
        rundir.teacher = extra.teachers.identity
    progress = Progress()
    if cfg.resume and rundir.has_checkpoint():
        progress = restore_state(rundir.last_checkpoint, task, rundir.teacher, rundir.data_checksum)
        check_best_files(rundir, task, progress)  # now, not at the end after more epochs
        if progress.epoch < cfg.epochs:
            log.info("resuming %s at epoch %d, step %d", shown(out), progress.epoch + 1, progress.step)
        else:
            log.info("resuming %s: all %d epochs are trained; evaluating", shown(out), cfg.epochs)
    if progress.global_step == 0:
        check_teacher(task, extra.teachers)  # before anything is written
    signals = extra.teachers.signals if extra.teachers is not None else []
    task.costs = measure_training(task, signals, info.image_size)  # one counted step, state restored
    rundir.open(info, task, progress)
    show = rt.is_main and not cfg.quiet  # a run that talks; after open: a failure to write stays one line
    if show:
        say("%s", start_line(task, torch.get_num_threads()))
    if extra.teacher_outputs:
        rundir.note("teacher_outputs", extra.teacher_outputs)
    log.info("%s | %s on %s (%s) | %s", shown(out), cfg.algo, cfg.dataset,
             " / ".join(f"{k} {v}" for k, v in info.sizes.items()), task.objective)
    store = extra.teachers.signals[0].store if extra.teachers is not None else None
    finished, checkpointed = _fit(task, progress, rundir, Talk(rundir, task, progress, show, store))
    if not finished:
        return _stopped(task, progress, rundir, checkpointed)
    try:
        with interrupt_on_sigterm(also_sigint=True):
            fault_point("final")
            final = final_evaluation(task, rundir)
    except KeyboardInterrupt:  # every epoch is trained and checkpointed: a resume only evaluates
        return _stopped(task, progress, rundir, True, "stopped by a signal during the final evaluation; every "
                        "epoch is trained and checkpointed")
    for signal_ in extra.teachers.signals if extra.teachers is not None else []:
        if signal_.store is not None:
            stats = signal_.store.stats
            log.info("teacher store: %d batches read, %d computed, %d files written, %d rebuilt", stats["hits"],
                     stats["misses"], stats["written"], stats["rebuilt"])
    summary = rundir.write_summary(task, progress, status="completed", final=final,
                                   teacher_source=extra.teacher_source, costs=_costs(task, extra, rundir))
    rundir.close()
    return RunResult(out, cfg, summary)


def _fit(task: Task, progress: Progress, rundir: RunDir, talk: Talk) -> tuple[bool, bool]:
    """Train to the end or to a stop request (SIGINT/SIGTERM, handled by the run directory): ``(finished,
    checkpointed)``, the latter whether last.pt holds the state at the stop."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, rundir.request_stop)
    if hasattr(signal, "SIGCHLD"):  # request_stop may replace it; restored below
        previous[signal.SIGCHLD] = signal.getsignal(signal.SIGCHLD)
    try:
        return fit(task, progress, talk), True
    except RuntimeError as e:
        # A SIGTERM sent to the whole process group also ends the data-loading workers, and the loader
        # raises: the step cannot finish, so the run stops at the checkpoint it already has.
        if not (rundir.stop_requested and "DataLoader worker" in str(e)):
            raise
        return False, False
    except TrainingDiverged as e:
        rundir.write_summary(task, progress, status="diverged", reason=str(e))
        rundir.close()
        where = (f"the last good checkpoint is {rundir.last_checkpoint}" if rundir.has_checkpoint()
                 else "no checkpoint had been written yet")
        raise UserError(f"training diverged: {e}; {where}; start again with a lower --lr or with --grad-clip"
                        ) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _costs(task: Task, extra: Assembly, rundir: RunDir) -> dict[str, dict[str, Any]]:
    """Every model's cost (students timed on rank 0) and each teacher's own training cost."""
    if task.costs is not None:
        task.costs.peak = peak_memory(task.rt.device)  # before the timing's own allocations
    teachers = extra.teachers
    assert task.cfg.eval_batch_size is not None
    costs = model_costs(task, extra.data.image_size, teachers.signals if teachers else [],
                        timed=task.rt.is_main, batch=min(task.cfg.eval_batch_size, 256))
    for name, source in zip([m.name for m in task.teachers], teachers.sources if teachers else []):
        if task.rt.is_main:
            costs[name]["training_cost"] = teacher_training_cost(source, rundir.out, cache_dir(task.cfg))
    return costs


def _stopped(task: Task, progress: Progress, rundir: RunDir, checkpointed: bool,
             reason: str | None = None) -> RunResult:
    """Record a run stopped by SIGINT/SIGTERM (summary status ``interrupted``)."""
    if reason is None:
        reason = _stop_reason(progress, rundir, checkpointed)
    summary = rundir.write_summary(task, progress, status="interrupted", reason=reason)
    rundir.close()
    log.info("%s (%s)", reason, shown(rundir.last_checkpoint))
    return RunResult(rundir.out, task.cfg, summary)


def _stop_reason(progress: Progress, rundir: RunDir, checkpointed: bool) -> str:
    if checkpointed:
        return f"stopped by a signal at epoch {progress.epoch + 1}, step {progress.step}; checkpoint written"
    elif rundir.has_checkpoint():
        return "stopped by a signal that also ended the data-loading workers; the last checkpoint stays"
    return "stopped by a signal before the first checkpoint; start again with --overwrite"


def final_evaluation(task: Task, rundir: RunDir) -> dict[str, dict[str, Any]]:
    """Test metrics at the last epoch and at each student's (and member's) best-on-val epoch, and the teacher's."""
    task.rt.barrier()  # rank 0 wrote the best checkpoints every rank reads below
    cohort = len(task.students) > 1
    has_test = len(task.loaders["test"].sampler.labels) > 0
    final: dict[str, dict[str, Any]] = {}
    if has_test:
        for name, m in evaluate_all(task, "test", reliability=True).items():
            final.setdefault(name, {})["test_last"] = m
    for s in [*task.students, *task.members]:  # switch every student (and member) to its best-on-val weights
        state, _ = read_state_dict(rundir.best_path(s.name))
        unwrap(s.model).load_state_dict(state)
    if cohort:
        val = evaluate(task, task.students, "val", ensemble=True)
        final.setdefault("ensemble", {})["val_best"] = val["ensemble"] | {"epoch": None}
    if has_test:
        for name, m in evaluate_all(task, "test", reliability=True).items():
            final.setdefault(name, {})["test"] = m
    if task.teacher is not None:
        splits = ["val", "test"] if has_test else ["val"]
        for split in splits:
            for name, m in evaluate(task, task.teachers or [task.teacher], split,
                                    reliability=split == "test").items():
                final.setdefault(name, {})["val_best" if split == "val" else "test"] = (
                    m | {"epoch": None} if split == "val" else m)
    return final
