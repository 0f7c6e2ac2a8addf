"""Speed benchmark (issue 5): end-to-end throughput against the model-math bound, the teacher store, scaling.

One command, one run (``make bench`` = ``python benchmarks/run.py``)::

    python benchmarks/run.py [--only main,methods,features,store,scaling,pipeline,options,cifar] [--reps 3]
                             [--samples 8000]

Sections: ``main`` (kd, dml, tfkd) and ``methods`` (issue 10: dkd, dist, kdcl, pcl) measure (a) against (b)
below, each workload in a child process of its own; ``features`` (issue 11) measures kd, at, fitnet and crd
end to end in one child process (below); ``store`` adds the teacher-output store to the kd workload;
``scaling``, ``pipeline``, ``options`` and ``cifar`` as their headings say. The ``cifar`` section (issue 13)
is resnet32x4 -> resnet8x4 KD (random teacher) on CIFAR-shaped synthetic data (3 x 32 x 32, 100 classes,
``--augment cifar``, SGD, batch 64): the same (a) and (b) as below. On a GPU its in-memory images live on
the device (``data.loader.resident``), so no epoch copies them.

What each number contains (every workload: MNIST t10k carved 0.8 / 0.2 / 0.0 = 8,000 train / 2,000 val,
28 x 28 grayscale expanded to 3 channels, stock torchvision ResNet stems, per-sample RandAugment,
batch 256 (31 steps, the ragged tail is dropped: 7,936 images), fp32, 2 threads; each method with its
own defaults: kdcl and pcl a cohort of 2 resnet18, dkd, dist and the feature methods a resnet50 teacher
with random weights, run live -- ``--teacher-weights random`` is accepted by the weak-teacher check):

* **ours (a)**: ``distillistic.training.run.train`` with ``epochs=1`` -- the real API path, run directory,
  TensorBoard and checkpoints included. Its time is the engine's own clock: the training epoch
  (loading, augmentation, every forward/backward/step, signals, metrics) plus the validation pass
  over 2,000 images: the students' forwards (and the cohort's ensemble), the teacher's forward where
  there is one (the students' agreement with it), and the forwards of the models kept beside the
  students (PCL's EMA copies), which the engine evaluates in a second pass. Setup (reading the data,
  building models, the teacher check, hashing the teacher for the store), the end-of-epoch checkpoint
  writes and the final evaluation (where the teacher is evaluated once) are *not* in it; they are shown
  apart as the run's total wall time.
* **bound (b)**: the same models and optimizers, built by the same code (``run.build_task``), on pre-made
  float tensors, driven by what the task holds rather than by the algorithm's name: 31 steps of every
  student's forward, cross-entropy, backward and optimizer step, plus every frozen teacher's forward (kd,
  dkd, dist), plus, for the models the objective keeps beside the students (``task.members``: PCL's
  temporal-mean EMA copies, ``--ema``'s), the forward on the batch of each one a term reads (PCL's, under
  ``no_grad``, ``eval()`` mode) and every copy's update after the optimizer steps (one fused lerp of the
  parameters, the buffers copied); then the forwards of every model the engine validates (students and
  members) over 2,000 validation images. Not in (b): the methods' loss arithmetic beyond cross-entropy
  (KL, DKD, DIST, KDCL's min-logit target: B x K tensors), the teacher's forward on val, metrics. The
  report lists what (b) ran for each workload.
* img/s = 7,936 training images / (epoch + validation seconds); ratio = a / b.

Repetitions of (a) and (b) alternate (a b, b a, a b, ...) in one process per workload, after a
two-step warm-up run, and the medians are reported; peak RSS is that process's ``ru_maxrss``.
Each workload runs in its own child process, so one workload's memory does not count for another.

**features** (issue 11): resnet50 (random weights, live: feature methods read its stages, which the
teacher-output store does not hold; the store is off for kd too) -> resnet18, the same data and settings
as the kd workload, each method with its defaults (at: every spatial stage both share, beta 1000;
fitnet: stage2, beta 100; crd: 16,384 negatives or the training split - 1, beta 0.8; no added KD term;
crd-shared: crd with one draw of negatives for the whole batch, ``--crd-shared-negatives``).
In one child process: a two-step warm-up run of each method, then ``--reps`` end-to-end runs of each, in
alternating order (kd at fitnet crd, crd fitnet at kd, ...), each run building its own models. Reported
per method: the median of the engine's training-epoch seconds / steps (ms per step: loading, augmentation,
the student's forward, the teacher's forward with its taps, the method's terms and adapters, backward,
step, signals, metrics), its ratio to KD's median (and per repetition, to KD's run of the same
repetition), the issue's target (at, fitnet <= 1.10x; crd, crd-shared <= 1.25x), the validation seconds apart and
the run's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
KD = {"model": "resnet18", "teacher": "resnet50", "teacher_weights": "random"}  # a random teacher: fine for speed
WORKLOADS: dict[str, dict[str, Any]] = {
    "kd": {"algo": "kd", **KD},
    "dml": {"algo": "dml", "model": "resnet18", "students": 3},
    "tfkd": {"algo": "tfkd", "model": "resnet18"},
    # issue 10's methods, each with its own defaults (kdcl and pcl: the cohort of 2 they default to)
    "dkd": {"algo": "dkd", **KD},
    "dist": {"algo": "dist", **KD},
    "kdcl": {"algo": "kdcl", "model": "resnet18"},
    "pcl": {"algo": "pcl", "model": "resnet18"},
}
SECTIONS = {"main": ("kd", "dml", "tfkd"), "methods": ("dkd", "dist", "kdcl", "pcl")}  # (a) against (b)
FEATURES = ("kd", "at", "fitnet", "crd", "crd-shared")  # issue 11: each one's step against KD's, in one process
FEATURE_TARGETS = {"at": 1.10, "fitnet": 1.10, "crd": 1.25, "crd-shared": 1.25}  # the targets, x KD's step
FEATURE_OPTIONS = {"crd-shared": {"algo": "crd", "crd_shared_negatives": True}}  # variants of a method


# --- measurements (run inside a child process) ---------------------------------------------------------


def base_config(data: Path, samples: int, **overrides: Any) -> Any:
    from distillistic import Config

    values: dict[str, Any] = {
        "dataset": "mnist", "data_root": str(data / "mnist-t10k"), "split_fractions": (0.8, 0.2, 0.0),
        "batch_size": 256, "precision": "fp32", "augment": "randaugment", "epochs": 1, "progress": False,
        "teacher_store": "off", "max_train_samples": samples if samples < 8000 else None,
    }
    return Config(**(values | overrides))


def end_to_end(cfg: Any, scratch: Path) -> dict[str, float]:
    """One run through ``distillistic.training.run.train``; the engine's epoch and validation seconds."""
    from distillistic import train

    out = Path(tempfile.mkdtemp(dir=scratch))
    start = time.perf_counter()
    train(cfg.replace(out=str(out), overwrite=True))
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = max(r["epoch"] for r in rows)
    train_row = next(r for r in rows if r["split"] == "train" and r["epoch"] == last)
    # Validation is one ``evaluate`` call for the students (and their ensemble) and, when the run keeps other
    # evaluated models (PCL's or --ema's EMA copies), a second one for those: each call's rows share its seconds.
    val_s = sum({r["seconds"] for r in rows if r["split"] == "val" and r["epoch"] == last and "seconds" in r})
    images = train_row["images_per_second"] * train_row["seconds"]
    shutil.rmtree(out, ignore_errors=True)
    return {"train_s": train_row["seconds"], "val_s": val_s, "wall_s": wall, "images": round(images),
            "steps": round(images) // cfg.batch_size}


def model_math(cfg: Any) -> tuple[Callable[[], dict[str, float]], str]:
    """The bound: the run's own models and optimizers, on pre-made tensors (built once, timed per call), and
    what it contains, in words.

    What it runs is read from the task, not from the algorithm's name: every student (forward, cross-entropy,
    backward, optimizer step); every frozen teacher's forward; the models the objective keeps beside the
    students (``task.members``: PCL's and ``--ema``'s EMA copies) -- the ones a teaching term reads forwarded on
    their student's view under ``no_grad`` in ``eval()`` mode, every one updated from its student after the
    optimizer steps (``θ' ← d·θ' + (1 − d)·θ``, one fused lerp, buffers copied); then every model the engine
    validates (students and members) over the validation batches.
    """
    import torch
    import torch.nn.functional as F

    from distillistic.config import student_archs
    from distillistic.training import setup
    from distillistic.training.run import build_task
    from distillistic.training.runtime import resolve_runtime

    cfg = setup.resolve(cfg.replace(out="unused"))
    rt = resolve_runtime(cfg)
    task, extra = build_task(cfg, rt)
    info, k = extra.data, task.num_classes
    steps, batch = len(task.loaders["train"]), cfg.batch_size
    val_sizes = [len(b) for b in task.loaders["val"].sampler.batches(0)]
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    teachers = task.teachers or ([task.teacher] if task.teacher is not None else [])
    by_name = {s.name: s for s in task.students}
    read = {id(model) for term in task.objective.extra for companion in term.companions
            for _, _, model in companion.members()}  # the companions a term reads (its targets)
    # (copy, the student it follows, whether a term reads it in training)
    copies = [(m, by_name[m.follows], id(m.raw) in read) for m in task.members if m.follows is not None]
    evaluated = [*task.students, *task.members]

    def tensor(n: int, size: int | None) -> torch.Tensor:
        s = size or info.image_size
        return torch.randn(n, 3, s, s, generator=g).contiguous(memory_format=fmt)

    x = {m.view_size: tensor(batch, m.view_size) for m in [*task.students, *teachers]}
    y = torch.randint(0, k, (batch,), generator=g)
    val = {m.view_size: [tensor(n, m.view_size) for n in val_sizes] for m in evaluated}
    pairs: list[tuple[list[torch.Tensor], ...]] = [
        ([*c.raw.parameters()], [p.detach() for p in s.raw.parameters()], [*c.raw.buffers()], [*s.raw.buffers()])
        for c, s, _ in copies]
    for ema, src, ema_buffers, src_buffers in pairs:
        assert len(ema) == len(src), "an EMA copy unlike its student"
        assert len(ema_buffers) == len(src_buffers), "an EMA copy unlike its student"
    archs = student_archs(cfg, len(task.students))
    contains = [f"{len(archs)} x {archs[0]}" if len(set(archs)) == 1 and len(archs) > 1 else " + ".join(archs)]
    contains += [f"teacher {', '.join(cfg.teacher or ())} forward (no_grad)"] if teachers else []
    if copies:
        forwarded = sum(reads for _, _, reads in copies)
        contains.append(f"{len(copies)} EMA copies (update{', forward' if forwarded else ''}, val)")

    def run() -> dict[str, float]:
        for s in task.students:
            s.model.train()
        for c, _, _ in copies:
            c.raw.eval()
        start = time.perf_counter()
        for _ in range(steps):
            with rt.autocast():
                logits = [s.model(x[s.view_size]) for s in task.students]
                with torch.no_grad():
                    for t in teachers:
                        t.model(x[t.view_size])
                    for c, _, reads in copies:
                        if reads:
                            c.raw(x[c.view_size])
                loss = torch.stack([F.cross_entropy(z.float(), y) for z in logits]).sum()
            for opt in task.optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in task.optimizers:
                opt.step()
            with torch.no_grad():
                for ema, src, ema_buffers, src_buffers in pairs:
                    torch._foreach_lerp_(ema, src, 1.0 - 0.999)
                    torch._foreach_copy_(ema_buffers, src_buffers)
        mid = time.perf_counter()
        with torch.no_grad(), rt.autocast():
            for m in evaluated:
                m.raw.eval()
            for i in range(len(val_sizes)):
                for m in evaluated:
                    m.raw(val[m.view_size][i])
        end = time.perf_counter()
        return {"train_s": mid - start, "val_s": end - mid, "images": steps * batch, "steps": steps}

    return run, " + ".join(contains)


def warm_up(cfg: Any, scratch: Path) -> None:
    """Two steps and a validation pass, so that first-call costs (kernel selection, allocator) are paid."""
    end_to_end(cfg.replace(max_train_samples=2 * cfg.batch_size, teacher_store="off"), scratch)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_workload(job: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """(a) and (b) of one workload, alternating; for KD also the teacher store, cold then warm."""
    name = job["workload"]
    cfg = base_config(Path(job["data"]), job["samples"], **WORKLOADS[name], **job.get("options", {}))
    warm_up(cfg, scratch)
    bound, contains = model_math(cfg)
    variants: dict[str, Callable[[], dict[str, float]]] = {"a": lambda: end_to_end(cfg, scratch), "b": bound}
    out: dict[str, Any] = {"workload": name, "bound_contains": contains}
    if job.get("store"):
        store_cfg = cfg.replace(teacher_store=str(Path(tempfile.mkdtemp(dir=scratch)) / "store"))
        out["cold"] = [end_to_end(store_cfg, scratch)]  # the first run of a sweep: computes and writes
        variants["warm"] = lambda: end_to_end(store_cfg, scratch)
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for rep in range(job["reps"]):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for v in order:
            results[v].append(variants[v]())
    out |= results
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def child_runs(job: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """End-to-end runs of a list of configs, one each (the scaling table and the options)."""
    rows = []
    data = Path(job["data"])
    for spec in job["runs"]:
        keys = {k: v for k, v in spec.items() if k not in ("label", "samples")}
        cfg = base_config(data, spec["samples"], **keys)
        if cfg.epochs == 1:  # with two epochs the second is measured, after every first-call cost
            warm_up(cfg, scratch)
        rows.append(spec | end_to_end(cfg, scratch))
    return {"rows": rows, "peak_rss_mb": peak_rss_mb()}


def child_pipeline(job: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """ImageNet-style input: JPEG decode + RandomResizedCrop (one worker's work), then the two views."""
    import torch

    from distillistic.config import Config
    from distillistic.data.loader import Batch, EpochSampler, Loader, _FileDataset, build_data, default_workers
    from distillistic.data.views import ViewMaker

    size, student = 224, 112
    cfg = Config(dataset="imagefolder", data_root=str(Path(job["data"]) / "imagenet-sample100"),
                 image_size=size, split_fractions=(0.98, 0.01, 0.01), augment="randaugment")
    bundle = build_data(cfg)
    source = bundle.splits["train"]
    dataset = _FileDataset(source, size, train=True, data_seed=0)  # type: ignore[arg-type]
    n, epochs = len(source), 4
    dataset[(0, 0)]
    start = time.perf_counter()
    items = [dataset[(e, i)] for e in range(epochs) for i in range(n)]
    decode_s = time.perf_counter() - start
    views = ViewMaker(bundle.info, "randaugment", 0, torch.device("cpu"))
    images = torch.stack([img for img, _, _ in items[:n]])
    batch = Batch(images, torch.zeros(n, dtype=torch.long), torch.arange(n), 0)
    views(batch, train=True).get(student, 3)
    start = time.perf_counter()
    for e in range(epochs):
        v = views(Batch(images, batch.labels, batch.index, e), train=True)
        v.get(size, 3), v.get(student, 3)
    views_s = time.perf_counter() - start
    workers = default_workers()
    loader = Loader(source, EpochSampler(source.labels, 32, 0, shuffle=True), size, True, 0, workers=workers)
    next(iter(loader.epoch(0)))
    start = time.perf_counter()
    count = 0
    for e in range(epochs):
        for b in loader.epoch(e):
            v = views(b, train=True)
            v.get(size, 3), v.get(student, 3)
            count += len(b.labels)
    loader_s = time.perf_counter() - start
    return {"decode_crop_per_worker": n * epochs / decode_s, "views_main_process": n * epochs / views_s,
            "loader": {"workers": workers, "images_per_s": count / loader_s}, "images": n, "epochs": epochs,
            "peak_rss_mb": peak_rss_mb()}


def child_memory(job: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """Peak RSS of one run of a workload in a fresh process, and what the imports alone take."""
    import torch  # noqa: F401  (the imports a run makes, before any data or model exists)
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    import distillistic.training.run  # noqa: F401

    imports = peak_rss_mb()
    name = job["workload"]
    end_to_end(base_config(Path(job["data"]), job["samples"], **WORKLOADS[name]), scratch)
    return {"workload": name, "imports_mb": imports, "peak_rss_mb": peak_rss_mb()}


CIFAR_KD = {"algo": "kd", "model": "resnet8x4", "teacher": "resnet32x4", "teacher_weights": "random"}


def cifar_config(samples: int, **overrides: Any) -> Any:
    """resnet32x4 -> resnet8x4 KD on CIFAR-shaped data: 3 x 32 x 32, 100 classes, crop + flip, SGD, batch 64."""
    from distillistic import Config

    values: dict[str, Any] = {
        "dataset": "synthetic", "synthetic_channels": 3, "synthetic_classes": 100, "image_size": 32,
        "synthetic_samples": samples, "split_fractions": (0.8, 0.2, 0.0), "augment": "cifar", "batch_size": 64,
        "optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4, "scheduler": "multistep", "milestones": (150,),
        "warmup_fraction": 0.0, "precision": "fp32", "epochs": 1, "progress": False, "teacher_store": "off",
        **CIFAR_KD,
    }
    return Config(**(values | overrides))


def child_cifar(job: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """(a) and (b) of the CIFAR KD benchmark pair, alternating, after a warm-up run."""
    cfg = cifar_config(job["samples"], **job.get("options", {}))
    warm_up(cfg, scratch)
    bound, contains = model_math(cfg)
    variants: dict[str, Callable[[], dict[str, float]]] = {"a": lambda: end_to_end(cfg, scratch), "b": bound}
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for rep in range(job["reps"]):
        for v in (list(variants) if rep % 2 == 0 else list(reversed(variants))):
            results[v].append(variants[v]())
    return {"workload": "cifar kd resnet32x4 -> resnet8x4", "bound_contains": contains, **results,
            "peak_rss_mb": peak_rss_mb()}


def child_features(job: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """KD and the feature methods end to end in one process: a warm-up run of each, then repetitions in
    alternating order (kd at fitnet crd, crd fitnet at kd, ...), so that drift of the machine hits all alike."""
    data = Path(job["data"])
    cfgs = {m: base_config(data, job["samples"], **(KD | {"algo": m} | FEATURE_OPTIONS.get(m, {})))
            for m in job["methods"]}
    for cfg in cfgs.values():
        warm_up(cfg, scratch)
    results: dict[str, list[dict[str, float]]] = {m: [] for m in cfgs}
    for rep in range(job["reps"]):
        for m in (list(cfgs) if rep % 2 == 0 else list(reversed(cfgs))):
            results[m].append(end_to_end(cfgs[m], scratch))
    return {"runs": results, "peak_rss_mb": peak_rss_mb()}


CHILDREN = {"workload": child_workload, "runs": child_runs, "pipeline": child_pipeline, "memory": child_memory,
            "cifar": child_cifar, "features": child_features}


# --- orchestration -------------------------------------------------------------------------------------


def spawn(job: dict[str, Any]) -> dict[str, Any]:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"benchmark child {job.get('workload') or job['kind']} failed ({proc.returncode})")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def med(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def rate(rows: list[dict[str, float]]) -> float:
    """img/s of the median repetition (training images over epoch + validation seconds)."""
    return statistics.median(r["images"] / (r["train_s"] + r["val_s"]) for r in rows)


def report_main(results: list[dict[str, Any]]) -> list[str]:
    lines = ["| workload | ours (a) img/s | bound (b) img/s | a / b | a: epoch + val s | b: epoch + val s "
             "| run wall s | peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        a, b = r["a"], r["b"]
        lines.append(f"| {r['workload']} | {rate(a):.0f} | {rate(b):.0f} | {rate(a) / rate(b):.3f} | "
                     f"{med(a, 'train_s'):.2f} + {med(a, 'val_s'):.2f} | {med(b, 'train_s'):.2f} + "
                     f"{med(b, 'val_s'):.2f} | {med(a, 'wall_s'):.1f} | {r['peak_rss_mb']:.0f} |")
    for r in results:
        if "warm" in r:
            lines += ["", "| KD teacher store | img/s | vs KD without store | run wall s |", "|---|---|---|---|"]
            for label, rows in (("off (teacher live)", r["a"]), ("cold (first run, writes)", r["cold"]),
                                ("warm (later runs, reads)", r["warm"])):
                lines.append(f"| {label} | {rate(rows):.0f} | {rate(rows) / rate(r['a']):.2f}x | "
                             f"{med(rows, 'wall_s'):.1f} |")
    lines += ["", "bound (b) per step: every student's forward, cross-entropy, backward and optimizer step, plus:"]
    lines += [f"- {r['workload']}: {r['bound_contains']}" for r in results]
    return lines


def ms_per_step(row: dict[str, float]) -> float:
    return 1000 * row["train_s"] / row["steps"]


def report_features(runs: dict[str, list[dict[str, float]]]) -> list[str]:
    """Per method: the median training ms per step, its ratio to KD's (of the medians, and per repetition)."""
    kd = runs["kd"]
    base = statistics.median(ms_per_step(r) for r in kd)
    lines = ["| method | training ms / step | x KD's step | per repetition x KD | target | val s | run wall s |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in runs.items():
        step = statistics.median(ms_per_step(r) for r in rows)
        paired = " / ".join(f"{ms_per_step(r) / ms_per_step(k):.2f}" for r, k in zip(rows, kd))
        target = f"<= {FEATURE_TARGETS[name]:.2f}" if name in FEATURE_TARGETS else "-"
        lines.append(f"| {name} | {step:.1f} | **{step / base:.3f}** | {paired} | {target} | "
                     f"{med(rows, 'val_s'):.2f} | {med(rows, 'wall_s'):.1f} |")
    return lines


def report_runs(title: str, rows: list[dict[str, Any]], axis: str) -> list[str]:
    lines = [f"| {title} | {axis} | epoch s | val s | ms / training image | img/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r[axis]} | {r['train_s']:.2f} | {r['val_s']:.2f} | "
                     f"{1000 * r['train_s'] / r['images']:.3f} | {r['images'] / (r['train_s'] + r['val_s']):.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="main,methods,features,store,scaling,pipeline,options,cifar",
                        help="sections, comma-separated: main (kd, dml, tfkd: a vs b, and one run each in a fresh "
                             "process for memory), methods (dkd, dist, kdcl, pcl: a vs b), features (kd, at, fitnet, "
                             "crd end to end in one process: ms per training step and its ratio to kd's, val s "
                             "apart), store, scaling, pipeline, options, cifar; or single workloads of main or "
                             "methods (kd, dml, tfkd, dkd, dist, kdcl, pcl)")
    parser.add_argument("--cifar-samples", type=int, default=2000,
                        help="CIFAR section: synthetic 32 px images (80%% train, 20%% val)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of (a) and (b) per workload, and of each "
                        "method's run in the features section")
    parser.add_argument("--samples", type=int, default=8000, help="training images of the main workloads")
    parser.add_argument("--data", default=str(DATASETS), help="folder holding mnist-t10k and imagenet-sample100")
    parser.add_argument("--features", default=",".join(FEATURES),
                        help="features section: the methods to run, kd first (crd-shared: crd with "
                             "--crd-shared-negatives)")
    parser.add_argument("--json", help="also write every measurement to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        with tempfile.TemporaryDirectory() as scratch:
            print(json.dumps(CHILDREN[job["kind"]](job, Path(scratch))))
        return
    only = set(args.only.split(","))
    data = Path(args.data)
    if not (data / "mnist-t10k").is_dir() and only - {"cifar"}:
        raise SystemExit(f"no mnist-t10k in '{data}'; pass --data")
    started, load = time.perf_counter(), os.getloadavg()
    print(f"# distillistic benchmark: {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
          f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, python {sys.version.split()[0]}")
    print(f"command: python benchmarks/run.py {' '.join(sys.argv[1:])}".rstrip(), flush=True)
    everything: dict[str, Any] = {"load_start": load}
    common = {"data": str(data), "samples": args.samples, "reps": args.reps}
    titles = {"main": "Throughput: ours (a) against the model-math bound (b)",
              "methods": "Issue 10's methods (DKD, DIST, KDCL, PCL): ours (a) against the model-math bound (b)"}
    for section, names in SECTIONS.items():
        workloads = [w for w in names if only & {section, w} or (w == "kd" and "store" in only)]
        if not workloads:
            continue
        store = bool(only & {"main", "store"})
        results = [spawn(common | {"kind": "workload", "workload": w, "store": w == "kd" and store})
                   for w in workloads]
        everything[section] = results
        print(f"\n## {titles[section]}\n")
        print("\n".join(report_main(results)), flush=True)
        if section != "main":
            continue
        memory = [spawn(common | {"kind": "memory", "workload": w}) for w in workloads]
        everything["memory"] = memory
        print("\n| one run in a fresh process | peak RSS MB | of which imports (torch, torchvision, TensorBoard) |"
              "\n|---|---|---|")
        for m in memory:
            print(f"| {m['workload']} | {m['peak_rss_mb']:.0f} | {m['imports_mb']:.0f} |", flush=True)
    if "features" in only:
        r = spawn(common | {"kind": "features", "methods": args.features.split(",")})
        everything["features"] = r
        steps = r["runs"]["kd"][0]["steps"]
        print(f"\n## Feature methods against KD (issue 11): resnet50 (random, live) -> resnet18, one epoch of {steps} "
              f"steps each, {args.reps} repetition(s) alternating in one process (peak RSS "
              f"{r['peak_rss_mb']:.0f} MB)\n")
        print("\n".join(report_features(r["runs"])), flush=True)
    if "scaling" in only:
        print("\n## Scaling (one end-to-end epoch each)\n")
        tables = {
            "data size (tfkd)": ("samples", [{"label": "tfkd", "samples": n, **WORKLOADS["tfkd"]}
                                             for n in (2000, 4000, 8000)]),
            "cohort (dml, 4k images)": ("students", [{"label": "dml", "samples": 4000, **WORKLOADS["dml"],
                                                      "students": n} for n in (2, 3, 5)]),
            "student resolution (tfkd, 56 px input, 4k)": (
                "student_resolution", [{"label": "tfkd", "samples": 4000, **WORKLOADS["tfkd"], "image_size": 56,
                                        "student_resolution": s} for s in (14, 28, 56)]),
        }
        everything["scaling"] = {}
        for title, (axis, runs) in tables.items():
            rows = spawn({"kind": "runs", "data": str(data), "runs": runs})["rows"]
            everything["scaling"][title] = rows
            print("\n".join(report_runs(title, rows, axis)) + "\n", flush=True)
    if "pipeline" in only:
        if not (data / "imagenet-sample100").is_dir():
            print("\n(no imagenet-sample100: input pipeline skipped)")
        else:
            p = spawn({"kind": "pipeline", "data": str(data)})
            everything["pipeline"] = p
            print(f"\n## ImageNet-style input pipeline (224 px, {p['images']} real JPEGs x {p['epochs']} epochs)\n")
            print(f"- decode + RandomResizedCrop, one worker: {p['decode_crop_per_worker']:.0f} img/s")
            print(f"- RandAugment + normalise + full (224) and student (112) views, main process: "
                  f"{p['views_main_process']:.0f} img/s")
            loader = p["loader"]
            print(f"- the Loader with {loader['workers']} worker(s) + views: {loader['images_per_s']:.0f} img/s",
                  flush=True)
    if "options" in only:
        stock = [("resnet18, fp32", {}), ("resnet18, --precision bf16", {"precision": "bf16"}),
                 ("resnet18, --channels-last", {"channels_last": True}), ("resnet18, --compile", {"compile": True})]
        cifar = [("cifar_resnet18, fp32", {"model": "cifar_resnet18"}),
                 ("cifar_resnet18, --precision bf16", {"model": "cifar_resnet18", "precision": "bf16"}),
                 ("cifar_resnet18, bf16 + --channels-last", {"model": "cifar_resnet18", "precision": "bf16",
                                                             "channels_last": True})]
        runs = [{"label": label, "samples": samples, "epochs": 2, **WORKLOADS["tfkd"], **opts}
                for group, samples in ((stock, 4000), (cifar, 1024)) for label, opts in group]
        rows = spawn({"kind": "runs", "data": str(data), "runs": runs})["rows"]
        everything["options"] = rows
        print("\n## Options (tfkd; the second epoch, so compilation is excluded; 4k images, cifar stems 1k)\n")
        print("| option | epoch img/s | vs fp32 of the same model | run wall s |\n|---|---|---|---|")
        for r in rows:
            base = next(b for b in rows if b["label"] == r["label"].split(",")[0] + ", fp32")
            speed = r["images"] / r["train_s"]
            print(f"| {r['label']} | {speed:.0f} | {speed / (base['images'] / base['train_s']):.2f}x | "
                  f"{r['wall_s']:.0f} |")
    if "cifar" in only:
        r = spawn({"kind": "cifar", "samples": args.cifar_samples, "reps": args.reps})
        everything["cifar"] = r
        print(f"\n## CIFAR KD: resnet32x4 -> resnet8x4, one epoch of {args.cifar_samples} CIFAR-shaped images "
              "(crop + flip, SGD, batch 64)\n")
        print("\n".join(report_main([r])), flush=True)
    load = os.getloadavg()
    everything["load_end"] = load
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average at the end {load[0]:.2f} / {load[1]:.2f} / "
          f"{load[2]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
