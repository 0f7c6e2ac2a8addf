"""The training loop and the evaluation function: the only loop of the project.

One step, for any algorithm (DESIGN.md, section 1):

1. the batch becomes views on the device (augmented, normalised, downscaled for the students in
   cross-quality runs; one augmented view per student with ``--peer-views independent``);
2. every student runs one forward on its view;
3. one call of the objective (:meth:`~distillistic.core.objective.Objective.step`): its teaching stage
   gives the frozen teachers' outputs on the batch (read from their stores or computed), each term's
   teaching signal turns them and the students' *detached* logits into targets, and each student gets
   its loss;
4. one backward over their sum (the students share no graph, so each gets exactly its own gradient);
   every optimizer and scheduler steps, then the objective's terms and companions (EMA copies) update.
   An optimizer that takes the distillation terms' gradient apart (``training.optim.SplitGradients``, a
   method's own: DOT) gets two backwards instead, the distillation part's and then the rest's.

Files are written outside the step: the teacher stores' at the end of an epoch and of an evaluation.

Statistics stay on the device and are read once per log interval and at the end of the epoch; the
loop never branches on the algorithm, the device or the precision. Files are written by the
:class:`Hooks` the caller passes (see :mod:`distillistic.training.run`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from distillistic.config import Config
from distillistic.core.calibration import mce_from_sums
from distillistic.core.heldout import HeldOutAccumulator
from distillistic.core.metrics import MetricAccumulator, pairwise_kl
from distillistic.core.objective import Objective, StepLosses
from distillistic.core.signals import StepInputs, Tapped, model_view
from distillistic.data.loader import Batch, Loader
from distillistic.data.views import ViewMaker
from distillistic.errors import TrainingDiverged
from distillistic.training.checkpoint import unwrap
from distillistic.training.lines import prefix
from distillistic.training.listeners import notify_epoch
from distillistic.training.optim import SplitGradients
from distillistic.training.runtime import Runtime


@dataclass
class Member:
    """A model the loop runs: ``model`` may be wrapped (DDP, compiled); ``raw`` is the plain module."""

    name: str
    model: nn.Module
    view_size: int | None  # input size; None: the full view
    channels: int
    outputs: Callable[[StepInputs], Tensor] | None = None  # evaluation logits if not the model's (a stored teacher)
    norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # its own input (mean, std); None: the data's
    taps: Tapped | None = None  # hooks on the plain model's stages (feature methods), popped after every forward
    follows: str | None = None  # a member kept beside a student (its EMA copy): that student's name

    @property
    def raw(self) -> nn.Module:
        return unwrap(self.model)

    def eval_logits(self, inp: StepInputs) -> Tensor:
        """Logits ``[B, K]`` for an evaluation batch: ``outputs`` if given, else the plain model on its view."""
        if self.outputs is not None:
            return self.outputs(inp)
        z = self.raw(model_view(inp.views, self.view_size, self.channels, self.norm))
        self.features()  # evaluation needs no features: drop what the hooks kept
        return z

    def features(self) -> dict[str, Tensor]:
        """The stage maps the taps kept during the last forward (with its graph), ``{}`` without taps."""
        return self.taps.pop() if self.taps is not None else {}


@dataclass
class Task:
    """Everything a run trains with, built once from the config by :mod:`distillistic.training.run`."""

    cfg: Config
    rt: Runtime
    students: list[Member]
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    objective: Objective
    teacher: Member | None
    loaders: dict[str, Loader]
    views: ViewMaker
    num_classes: int
    show_progress: bool = False
    per_class: bool = False
    teachers: list[Member] = field(default_factory=list)  # every frozen teacher (teacher is teachers[0])
    teacher_temperatures: dict[str, float] = field(default_factory=dict)  # --teacher-calibration: T_cal each
    # Models the objective keeps beside the students (EMA copies): evaluated, selected on val, reported and
    # exported like students, never trained by an optimizer nor part of the students' ensemble.
    members: list[Member] = field(default_factory=list)
    # The training step's counted FLOPs (a training.costs.TrainCost), set before the loop; None: not counted.
    costs: Any = None

    @functools.cached_property
    def student_terms(self) -> list[list[nn.Parameter]]:
        """Each student's own parameters in the objective (adapters, temperatures), read once."""
        return [list(self.objective.student_parameters(i)) for i in range(len(self.students))]

    @property
    def term_parameters(self) -> list[nn.Parameter]:
        """The objective's trainable parameters (adapters, temperatures), every student's."""
        return [p for own in self.student_terms for p in own]

    @functools.cached_property
    def split_optimizers(self) -> list[SplitGradients]:
        """The optimizers that take the distillation terms' gradient apart (a method's own: DOT)."""
        return [opt for opt in self.optimizers if isinstance(opt, SplitGradients)]


@dataclass
class Progress:
    """Where training stands; everything here goes into the resumable checkpoint."""

    epoch: int = 0  # epoch in progress (0-based)
    step: int = 0  # steps of that epoch already done
    global_step: int = 0
    best: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> val metrics at its best epoch
    history: list[dict[str, Any]] = field(default_factory=list)  # every metrics row so far
    train_seconds: float = 0.0
    train_images: int = 0
    epoch_seconds: float = 0.0  # of the epoch in progress, before a mid-epoch checkpoint
    epoch_images: int = 0
    meters: list[Tensor] | None = None  # training sums of the epoch in progress (resume)
    teacher_flops: int = 0  # FLOPs of the teachers' forwards so far (a stored teacher's: where it was computed)
    best_files: dict[str, str] = field(default_factory=dict)  # model -> sha256 of its best-<model>.pt's weights


class Hooks(Protocol):
    def after_step(self, task: Task, progress: Progress, meters: TrainMeters) -> bool:
        """Called after every step; return True to stop now (a checkpoint has been written)."""
        ...

    def after_epoch(self, task: Task, progress: Progress, rows: list[dict[str, Any]], improved: list[str]) -> None:
        """Called after each epoch's validation with its rows and the students whose val top-1 improved."""
        ...


class TrainMeters:
    """One epoch's training statistics per student, as device tensors (no host sync to update)."""

    def __init__(self, task: Task) -> None:
        k, dev, n = task.num_classes, task.rt.device, len(task.students)
        self.loss_names = task.objective.names
        self.terms = [t.name for t in task.objective.extra]
        self.losses = torch.zeros(n, len(self.loss_names), device=dev, dtype=torch.float64)
        self.preds = [MetricAccumulator(k, dev, per_class=task.per_class) for _ in range(n)]
        self.signals = {(t, i): MetricAccumulator(k, dev) for t in self.terms for i in range(n)}
        self.extra = torch.zeros(3, device=dev, dtype=torch.float64)  # steps, sum of pairwise KL, non-finite losses

    def update(self, logits: list[Tensor], labels: Tensor, outs: list[dict[str, Tensor]],
               targets: dict[str, list[Tensor] | None]) -> None:
        self.losses += torch.stack([torch.stack([o[k].detach() for k in self.loss_names]) for o in outs]).double()
        for acc, z in zip(self.preds, logits):
            acc.update(z.detach(), labels)
        for name, qs in targets.items():
            for i, q in enumerate(qs or []):
                if i == 0 or q is not (qs or [])[0]:  # a signal shared by the cohort is counted once
                    self.signals[(name, i)].update_probs(q.mean(dim=0), labels)
        kl = pairwise_kl([z.detach() for z in logits]) if len(logits) > 1 else labels.new_zeros((), dtype=torch.float)
        bad = (~torch.isfinite(torch.stack([o["loss"].detach() for o in outs]))).sum()
        self.extra += torch.stack([torch.ones((), device=kl.device), kl.float(), bad.float()]).double()

    def tensors(self) -> list[Tensor]:
        out = [self.losses, self.extra]
        for acc in [*self.preds, *self.signals.values()]:
            out += acc.tensors()
        return out

    def load_tensors(self, tensors: list[Tensor]) -> None:
        for mine, theirs in zip(self.tensors(), tensors):
            mine.copy_(theirs)

    def check_finite(self, where: str, rt: Runtime | None = None) -> None:
        """Raise if any loss so far was NaN/inf; with ``rt``, on every rank if it happened on any (no hang)."""
        bad = self.extra[2:3].clone()
        if rt is not None:
            rt.all_reduce_([bad])
        if float(bad) > 0:
            raise TrainingDiverged(f"the loss became NaN or inf ({where})")

    def mean_loss(self) -> float:
        return float(self.losses[:, 0].sum() / self.extra[0].clamp(min=1) / len(self.preds))

    def rows(self, task: Task, names: list[str]) -> list[dict[str, Any]]:
        steps = max(float(self.extra[0]), 1.0)
        losses = (self.losses / steps).tolist()
        rows = []
        for i, name in enumerate(names):
            row: dict[str, Any] = {"model": name, "split": "train", **self.preds[i].compute()}
            row |= dict(zip(self.loss_names, losses[i]))
            for t in self.terms:
                acc = self.signals[(t, i)] if float(self.signals[(t, i)].sums[0]) else self.signals[(t, 0)]
                stats = acc.compute()
                row |= {f"{t}_target_entropy": stats["entropy"], f"{t}_target_ece": stats["ece"],
                        f"{t}_target_mce": mce_from_sums(acc.bins.cpu())}  # from the same bins: no extra work
            row |= task.objective.stats(i)  # the terms' own state (e.g. a learned temperature), once per epoch
            rows.append(row)
        if len(names) > 1:
            top1 = torch.tensor([r["top1"] for r in rows])
            rows.append({"model": "cohort", "split": "train", "pairwise_kl": float(self.extra[1]) / steps,
                         "top1_mean": float(top1.mean()), "top1_spread": float(top1.std(unbiased=False))})
        return rows


def train_step(task: Task, batch: Batch, progress: float, meters: TrainMeters) -> None:
    """One optimisation step of every student on one batch, at ``progress`` in [0, 1] of training."""
    rt = task.rt
    views = task.views.for_students(batch, len(task.students))  # one shared view, or each student its own
    labels = batch.labels.to(rt.device, non_blocking=True)
    with rt.autocast():
        logits = [s.model(model_view(v, s.view_size, s.channels, s.norm)) for s, v in zip(task.students, views)]
        inp = StepInputs(views[0], labels, [z.detach() for z in logits], task.num_classes, batch.epoch, batch.index,
                         progress=progress, features=[s.features() for s in task.students], student_views=views,
                         strong_views=task.views.strong_views(batch),
                         mixed_labels=task.views.mixed_labels(batch, labels))
        losses = task.objective.step(inp, logits, split=bool(task.split_optimizers))  # the one objective call
    _backward(task, losses)
    rt.average_gradients_(task.term_parameters)  # terms' own parameters live outside DDP's wrapper
    for student, opt, sched, own in zip(task.students, task.optimizers, task.schedulers, task.student_terms):
        if task.cfg.grad_clip:
            rt.scaler.unscale_(opt)
            nn.utils.clip_grad_norm_([*student.model.parameters(), *own], task.cfg.grad_clip)
        rt.scaler.step(opt)
        sched.step()
    rt.scaler.update()
    task.objective.after_step(inp)  # memory banks, EMA copies: after the optimizer step
    meters.update(logits, labels, losses.outs, losses.targets)


def _backward(task: Task, losses: StepLosses) -> None:
    """Every student's gradient. The students share no graph (signals are detached), so one backward gives each
    its own; optimizers that take the distillation gradient apart (``SplitGradients``, DOT) get it first."""
    rt = task.rt
    for opt in task.optimizers:
        opt.zero_grad(set_to_none=True)
    if not task.split_optimizers:
        rt.scaler.scale(torch.stack([o["loss"] for o in losses.outs]).sum()).backward()
        return
    distil = torch.stack([d for d, _ in losses.parts]).sum()
    if distil.requires_grad:
        rt.scaler.scale(distil).backward(retain_graph=True)
    for split in task.split_optimizers:
        split.take_distillation_gradients()
        split.zero_grad(set_to_none=True)  # type: ignore[attr-defined]  # an optimizer as well
    rt.scaler.scale(torch.stack([t for _, t in losses.parts]).sum()).backward()


def train_one_epoch(task: Task, progress: Progress, hooks: Hooks) -> list[dict[str, Any]] | None:
    """Train every student for the rest of epoch ``progress.epoch``; ``None`` if a hook stopped it."""
    cfg, loader = task.cfg, task.loaders["train"]
    for s in task.students:
        s.model.train()
    meters = TrainMeters(task)
    if progress.meters is not None:  # resuming in the middle of this epoch: every rank's sums so far, once
        if task.rt.is_main:
            meters.load_tensors(progress.meters)
        progress.meters = None
    steps = len(loader)
    bar = tqdm(total=steps, initial=progress.step, desc=f"{prefix()}epoch {progress.epoch + 1}/{cfg.epochs}",
               disable=not task.show_progress, leave=True, dynamic_ncols=True)
    start = time.perf_counter() - progress.epoch_seconds
    first = progress.step
    for batch in task.views.prepare(loader.epoch(progress.epoch, progress.step)):
        train_step(task, batch, (progress.epoch + progress.step / steps) / cfg.epochs, meters)
        progress.step += 1
        progress.global_step += 1
        progress.epoch_images += len(batch.labels) * task.rt.world_size
        progress.epoch_seconds = time.perf_counter() - start
        bar.update()
        if progress.step % cfg.log_every == 0:  # the only host syncs inside an epoch
            meters.check_finite(f"epoch {progress.epoch + 1}, step {progress.step}", task.rt)
            bar.set_postfix(loss=f"{meters.mean_loss():.4f}")
        if hooks.after_step(task, progress, meters):
            bar.close()
            task.objective.teaching.flush()
            return None
    bar.close()
    task.objective.teaching.flush()  # the teacher stores' completed epochs, written outside any step
    task.rt.all_reduce_(meters.tensors())
    meters.check_finite(f"epoch {progress.epoch + 1}")
    seconds, images = time.perf_counter() - start, progress.epoch_images
    progress.train_seconds += seconds
    progress.train_images += images
    rows = meters.rows(task, [s.name for s in task.students])
    if task.costs is not None:  # once per epoch: the counted step's FLOPs times the steps (training.costs)
        progress.teacher_flops += task.costs.take_teacher_flops(progress.step - first)
        for row in rows:
            row["train_flops"] = task.costs.total(progress)
    alpha = task.objective.alpha_at((progress.epoch + 1) / cfg.epochs)
    for row, opt in zip(rows, task.optimizers):
        row |= {"lr": opt.param_groups[0]["lr"], "alpha": alpha}
    for row in rows:
        row |= {"seconds": seconds, "images_per_second": images / max(seconds, 1e-9)}
    return rows


@torch.no_grad()
def evaluate(task: Task, members: list[Member], split: str, ensemble: bool = False,
             reliability: bool = False) -> dict[str, dict[str, Any]]:
    """Metrics of ``members`` on a held-out ``split``, plus their probability-averaging ensemble."""
    rt, loader = task.rt, task.loaders[split]
    for m in members:
        m.raw.eval()
    accs = {m.name: HeldOutAccumulator(task.num_classes, rt.device, per_class=task.per_class) for m in members}
    if ensemble:
        accs["ensemble"] = HeldOutAccumulator(task.num_classes, rt.device, per_class=task.per_class)
    # students are also scored against their one teacher (Stanton et al. 2021); a teacher itself is not
    alone = len(task.teachers) <= 1 and all(m is not task.teacher for m in members)
    teacher = task.teacher if alone else None
    start = time.perf_counter()
    for batch in loader.epoch(0):
        labels = batch.labels.to(rt.device, non_blocking=True)
        inp = StepInputs(task.views(batch, train=False), labels, [], task.num_classes, 0, batch.index, split)
        with rt.autocast():
            logits = [m.eval_logits(inp) for m in members]
            zt = teacher.eval_logits(inp) if teacher is not None else None
        for m, z in zip(members, logits):
            accs[m.name].update(z, labels, zt)
        if ensemble:
            probs = torch.stack([F.softmax(z.float(), dim=1) for z in logits]).mean(dim=0)
            accs["ensemble"].update_probs(probs, labels, zt)
    task.objective.teaching.flush()  # a stored teacher's evaluation outputs, recorded while evaluating
    rt.all_reduce_([t for acc in accs.values() for t in acc.tensors()])
    for acc in accs.values():  # ACE sorts every confidence: gather, not sum
        acc.load_samples(rt.all_gather_rows(acc.samples()))
    seconds = time.perf_counter() - start
    out = {}
    for name, acc in accs.items():
        metrics = acc.compute(reliability=reliability)
        out[name] = metrics | {"seconds": seconds, "images_per_second": int(metrics["n"]) / max(seconds, 1e-9)}
    return out


def evaluate_all(task: Task, split: str, reliability: bool = False) -> dict[str, dict[str, Any]]:
    """:func:`evaluate` of the students (with their ensemble, for a cohort) and of the task's other members."""
    out = evaluate(task, task.students, split, ensemble=len(task.students) > 1, reliability=reliability)
    if task.members:
        out |= evaluate(task, task.members, split, reliability=reliability)
    return out


def val_rows(task: Task, val: dict[str, dict[str, Any]], alpha: float | None) -> list[dict[str, Any]]:
    """Held-out rows with the same keys as training rows: ``ce`` is the NLL, training-only terms are null."""
    lrs = {s.name: opt.param_groups[0]["lr"] for s, opt in zip(task.students, task.optimizers)}
    terms = dict.fromkeys([*task.objective.names[2:], "loss"])
    rows = [{"model": name, "split": "val", **metrics, **terms, "ce": metrics["nll"], "lr": lrs.get(name),
             "alpha": alpha} for name, metrics in val.items()]
    if len(task.students) > 1:
        top1 = torch.tensor([val[s.name]["top1"] for s in task.students])
        rows.append({"model": "cohort", "split": "val", "top1_mean": float(top1.mean()),
                     "top1_spread": float(top1.std(unbiased=False))})
    return rows


def fit(task: Task, progress: Progress, hooks: Hooks) -> bool:
    """Train from ``progress`` to the last epoch, validating after each; False if a hook stopped it."""
    while progress.epoch < task.cfg.epochs:
        rows = train_one_epoch(task, progress, hooks)
        if rows is None:
            return False
        val = evaluate_all(task, "val")
        rows += val_rows(task, val, task.objective.alpha_at((progress.epoch + 1) / task.cfg.epochs))
        improved = []
        for s in [*task.students, *task.members]:
            best = progress.best.get(s.name)
            if best is None or val[s.name]["top1"] > best["top1"]:
                progress.best[s.name] = val[s.name] | {"epoch": progress.epoch + 1}
                improved.append(s.name)
        for row in rows:
            row["epoch"] = progress.epoch + 1
        progress.history += rows
        progress.epoch += 1
        progress.step = progress.epoch_images = 0
        progress.epoch_seconds = 0.0
        hooks.after_epoch(task, progress, rows, improved)
        notify_epoch(task.cfg, progress.epoch, rows)
    return True
