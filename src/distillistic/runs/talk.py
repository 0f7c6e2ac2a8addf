"""A run that talks: a start line, a line per epoch per model and a line every N steps or M seconds.

Lines go to the ``distillistic`` logger (the CLI sends it to stderr), on rank 0 only, whether or not
stderr is a terminal; ``--quiet`` silences them. A nested run (the teacher trained first) prefixes
its lines with ``teacher:`` through :func:`prefixed`. Reading the loss costs one host sync, so the
step lines (and TensorBoard's per-step loss and learning rate) read it only at their interval:
every ``line_every`` steps or ``line_seconds`` seconds, whichever comes first.
"""

from __future__ import annotations

import time
from typing import Any

from distillistic.config import Config, student_archs
from distillistic.core.signals import TeacherOutputs
from distillistic.errors import shown
from distillistic.training.engine import Hooks, Progress, Task, TrainMeters
from distillistic.training.lines import prefix, prefixed, say

__all__ = ["Talk", "epoch_lines", "prefix", "prefixed", "say", "start_line"]

def duration(seconds: float) -> str:
    """``h:mm:ss`` (``m:ss`` under an hour)."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def students_text(cfg: Config, count: int) -> str:
    """The students by architecture: ``3 x resnet18``, or ``resnet18, cnn`` for a cohort of several."""
    archs = student_archs(cfg, count)
    return f"{count} x {archs[0]}" if len(set(archs)) == 1 else ", ".join(archs)


def start_line(task: Task, threads: int) -> str:
    """Device, precision, threads and world size, and what trains on what."""
    cfg, rt = task.cfg, task.rt
    teacher = f", teacher {','.join(cfg.teacher or ())}" if task.teacher is not None else ""
    students = students_text(cfg, len(task.students))
    return (f"start: {cfg.algo} on {cfg.dataset}, {students}{teacher} | device {rt.device}, "
            f"precision {rt.precision}, {threads} threads, world size {rt.world_size} | {cfg.epochs} epochs of "
            f"{len(task.loaders['train'])} steps -> {shown(cfg.out or '.')}")


def epoch_lines(task: Task, rows: list[dict[str, Any]], epoch: int, eta: float) -> list[str]:
    """``epoch e/E student: loss .. val top1 .. ece .. lr .. img/s .. ETA ..`` per student (+ ensemble)."""
    train = {r["model"]: r for r in rows if r.get("split") == "train"}
    val = {r["model"]: r for r in rows if r.get("split") == "val"}
    lines = []
    nested = bool(prefix()) and len(task.students) == 1  # the teacher trained first: named by its architecture
    for name in [s.name for s in task.students] + (["ensemble"] if "ensemble" in val else []):
        t, v = train.get(name, {}), val.get(name, {})
        shown = task.cfg.model if nested else name
        loss = f"loss {t['loss']:.4f} " if isinstance(t.get("loss"), float) else ""
        lr = f" lr {t['lr']:.2e}" if isinstance(t.get("lr"), float) else ""
        speed = f" {t['images_per_second']:.0f} img/s" if isinstance(t.get("images_per_second"), float) else ""
        lines.append(f"epoch {epoch}/{task.cfg.epochs} {shown}: {loss}val top1 {v.get('top1', float('nan')):.4f} "
                     f"ece {v.get('ece', float('nan')):.4f}{lr}{speed} ETA {duration(eta)}")
    return lines


class Talk:
    """The engine's hooks around the run directory's: delegates every call, then talks.

    ``inner`` is the :class:`~distillistic.runs.rundir.RunDir` (it writes the files); ``show`` is
    False on ranks other than 0 and with ``--quiet``; ``store``: the (first) teacher's output store, if any.
    """

    def __init__(self, inner: Hooks, task: Task, progress: Progress, show: bool,
                 store: TeacherOutputs | None = None) -> None:
        self.inner, self.show, self.store = inner, show, store
        self.bars = task.show_progress
        self.started = time.perf_counter()
        self.first_epoch = progress.epoch
        stats = self._store_stats()
        self._store = (stats["hits"], stats["misses"]) if stats else (0, 0)
        self._first: tuple[float, int] | None = None  # (time, global step) after the first, warm-up step
        self._eta_said = False
        self._mark(progress, None)

    def _early_eta(self, task: Task, progress: Progress, now: float) -> None:
        """One line with the run's ETA from its first timed steps (the first step, a warm-up, is not timed),
        after 3 seconds or 20 steps: long before the first epoch ends."""
        if self._first is None:
            self._first = (now, progress.global_step)
            return
        elapsed, steps = now - self._first[0], progress.global_step - self._first[1]
        if steps < 1 or (elapsed < 3.0 and steps < 20):
            return
        self._eta_said = True
        per_step = elapsed / steps
        loaders = task.loaders
        total = len(loaders["train"]) * task.cfg.epochs
        # Evaluation (val every epoch, test at the end): a forward is about a third of a training step.
        evals = task.cfg.epochs * len(loaders["val"]) + 2 * len(loaders["test"])
        eta = per_step * (total - progress.global_step + evals / 3)
        say("ETA %s for %d epochs (%.2f s per step over the first %d timed steps)", duration(eta),
            task.cfg.epochs - progress.epoch, per_step, steps)

    def _mark(self, progress: Progress, sums: list[float] | None) -> None:
        self.last_time, self.last_step = time.perf_counter(), progress.step
        self.last_sums = sums or [0.0, 0.0]
        self.last_images = progress.epoch_images

    def after_step(self, task: Task, progress: Progress, meters: TrainMeters) -> bool:
        stop = self.inner.after_step(task, progress, meters)
        cfg = task.cfg
        now = time.perf_counter()
        if self.show and not self._eta_said:
            self._early_eta(task, progress, now)
        due = (cfg.line_every and progress.step % cfg.line_every == 0) or (
            cfg.line_seconds and now - self.last_time >= cfg.line_seconds)
        if not due or progress.step <= self.last_step:
            return stop
        # One host sync: the loss sums and the step count of the epoch so far (all students).
        loss_sum, steps = meters.losses[:, 0].sum().item(), meters.extra[0].item()
        d_steps = max(steps - self.last_sums[1], 1.0)
        loss = (loss_sum - self.last_sums[0]) / d_steps / len(task.students)
        lr = task.optimizers[0].param_groups[0]["lr"]
        speed = (progress.epoch_images - self.last_images) / max(now - self.last_time, 1e-9)
        log_step = getattr(self.inner, "log_step", None)
        if log_step is not None:
            log_step(progress.global_step, {"loss": loss, "lr": lr, "images_per_second": speed})
        if self.show and not self.bars:
            say("epoch %d/%d step %d/%d: loss %.4f lr %.2e %.0f img/s", progress.epoch + 1, cfg.epochs,
                progress.step, len(task.loaders["train"]), loss, lr, speed)
        self._mark(progress, [loss_sum, steps])
        return stop

    def after_epoch(self, task: Task, progress: Progress, rows: list[dict[str, Any]], improved: list[str]) -> None:
        self.inner.after_epoch(task, progress, rows, improved)
        done = progress.epoch - self.first_epoch
        eta = (time.perf_counter() - self.started) / max(done, 1) * (task.cfg.epochs - progress.epoch)
        if self.show:
            for line in epoch_lines(task, rows, progress.epoch, eta):
                say("%s", line)
            self._store_line(task, progress.epoch)
        self._mark(progress, None)

    def _store_line(self, task: Task, epoch: int) -> None:
        """While the teacher-output store is filled: how much of this epoch the teacher computed."""
        stats = self._store_stats()
        if stats is None:
            return
        hits, misses = stats["hits"] - self._store[0], stats["misses"] - self._store[1]
        self._store = (stats["hits"], stats["misses"])
        if misses:
            say("teacher store: filling (epoch %d: %d batches computed by the teacher and stored, %d read)",
                epoch, misses, hits)

    def _store_stats(self) -> dict[str, int] | None:
        """The teacher-output store's counters (batches read / computed), or None without a store."""
        stats = getattr(self.store, "stats", None)
        return stats if isinstance(stats, dict) else None
