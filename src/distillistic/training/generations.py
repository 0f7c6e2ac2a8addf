"""Methods trained as generations (born-again networks, :mod:`distillistic.methods.ban`).

``train(cfg)`` with such a method trains generation 1, 2, ... ``k`` one after the other, each a normal run
(its own config, checkpoints, metrics, summary, resumable by itself) in ``<out>/gen<g>``; generation ``g``'s
config comes from the method (:attr:`Method.generation`), taught by the run directory of generation
``g − 1`` (teacher weights read from a path). Then every generation's selected student and the ensemble of
generations (their mean probabilities) are evaluated on val and test, and ``<out>`` gets::

    config.yaml    the resolved config of the whole run (algo ban, generations k)
    manifest.json  the last generation's manifest, with the list of ``generations`` directories
    metrics.jsonl  the last generation's rows (the born-again student's history)
    summary.json   status; per generation its directory, algo, objective and status; models ``gen1`` ...
                   ``gen<k>`` (each generation's selected student), ``ensemble`` (of the generations) and
                   ``student`` (the last generation: the born-again student)

``--resume`` skips the generations already completed and resumes the one that was interrupted.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distillistic import config as config_mod
from distillistic.config import Config
from distillistic.errors import UserError, shown
from distillistic.methods.registry import METHODS
from distillistic.runs.resume import refuse_other_config
from distillistic.runs.rundir import read_summary
from distillistic.runs.summary import METRICS, clean
from distillistic.training import setup
from distillistic.training.checkpoint import atomic_write_json, atomic_write_text, read_state_dict
from distillistic.training.engine import Member, Task, evaluate
from distillistic.training.runtime import Runtime

log = logging.getLogger("distillistic")
RunOne = Callable[[Config, Runtime], Any]  # run.py's _run: a resolved config -> RunResult
BuildTask = Callable[[Config, Runtime], tuple[Task, Any]]


def _check_out(out: Path, cfg: Config) -> None:
    """Refuse an ``--out`` that holds a run already, unless resuming or overwriting it."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; choose a directory path")
    occupied = out.is_dir() and any((out / f).exists() for f in ("config.yaml", "summary.json", "gen1"))
    if occupied and not (cfg.resume or cfg.overwrite):
        raise UserError(f"'{out}' already holds a run; pass --resume to continue it, --overwrite to replace it, "
                        "or choose another --out")


def _check_saved_config(folder: Path, cfg: Config) -> None:
    """Refuse to resume ``folder`` (the whole run, or a completed generation) with settings other than those
    its ``config.yaml`` records, as a plain resume is refused: nothing may rewrite it to describe training
    that did not happen."""
    path = folder / "config.yaml"
    if not path.is_file():
        return
    try:
        saved = config_mod.read_yaml(path)
    except UserError:
        return  # unreadable: the generation's own resume (its last.pt) decides
    refuse_other_config(saved, cfg.to_dict(), f"the run being resumed ('{path}')")


def _generation(cfg: Config, g: int, previous: str | None, out: Path, rt: Runtime, run_one: RunOne) -> Any:
    """Train (or resume, or reuse when completed) generation ``g`` in ``out/gen<g>``; its RunResult-like."""
    method = METHODS.get(cfg.algo)
    assert method.generation is not None
    folder = out / f"gen{g}"
    gen = method.generation(cfg, g, previous).replace(out=str(folder))
    done = read_summary(folder)
    if cfg.resume and done.get("status") == "completed":
        resolved = setup.resolve(gen)
        _check_saved_config(folder, resolved)  # a completed generation of other settings is not this run's
        log.info("%s: generation %d is complete; skipping it", shown(folder), g)
        return None, resolved, done
    if cfg.resume and not (folder / "checkpoints" / "last.pt").is_file():
        gen = gen.replace(resume=False, overwrite=True)  # never checkpointed: nothing to lose, start it again
    resolved = setup.resolve(gen)
    result = run_one(resolved, rt)
    return result, resolved, result.summary


def _selected(summary: dict[str, Any]) -> dict[str, Any]:
    """A generation's selected student entry: its best student's (or only student's) summary entry."""
    models = summary.get("models", {})
    name = summary.get("best_student") or ("student" if "student" in models else next(iter(models), None))
    return dict(models.get(name) or {})


def _keep(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in [*METRICS, "n", "per_class_top1", "reliability", "epoch"] if k in m}


def _ensemble(configs: list[Config], folders: list[Path], rt: Runtime, build: BuildTask) -> dict[str, Any]:
    """Every generation's selected student and their probability-averaging ensemble on val and test."""
    task, _ = build(configs[0], rt)  # generation 1 (a baseline run): the data, views and a student to copy
    template = task.students[0]
    members = []
    for g, folder in enumerate(folders, start=1):
        model = copy.deepcopy(template.raw)
        state, _ = read_state_dict(folder)  # the generation's best student, best-on-val weights
        model.load_state_dict(state)
        members.append(Member(f"gen{g}", model, template.view_size, template.channels))
    splits = ["val"] + (["test"] if len(task.loaders["test"].sampler.labels) > 0 else [])
    return {split: evaluate(task, members, split, ensemble=True, reliability=split == "test") for split in splits}


def _costs(folders: list[Path]) -> dict[str, Any]:
    """The born-again run's costs: its student's (the last generation's model) and, as its training FLOPs, every
    generation's summed (generation g's teacher is generation g - 1, trained by this run, not a cached teacher)."""
    if not folders:
        return {}
    summaries = [read_summary(f) for f in folders]
    out: dict[str, Any] = {}
    student = (summaries[-1].get("costs") or {}).get("student")
    if student:
        out["costs"] = {"student": student}
    flops = [s.get("train_flops") for s in summaries]
    if all(isinstance(v, int | float) for v in flops):
        out["train_flops"] = sum(flops)
    return out


def train_generations(cfg: Config, rt: Runtime, run_one: RunOne, build: BuildTask) -> dict[str, Any]:
    """Train every generation of a resolved config, then evaluate them and their ensemble; the summary."""
    method = METHODS.get(cfg.algo)
    assert method.generations is not None
    out = Path(cfg.out or "")
    _check_out(out, cfg)
    if cfg.resume:
        _check_saved_config(out, cfg)
    count = method.generations(cfg)
    entries: list[dict[str, Any]] = []
    configs, folders, previous = [], [], None
    status, reason = "completed", None
    for g in range(1, count + 1):
        _, resolved, summary = _generation(cfg, g, previous, out, rt, run_one)
        entries.append({"generation": g, "out": f"gen{g}", "algo": resolved.algo,
                        "objective": summary.get("objective"), "status": summary.get("status")})
        if summary.get("status") != "completed":
            status, reason = summary.get("status") or "interrupted", f"generation {g}: {summary.get('reason')}"
            break
        configs.append(resolved)
        folders.append(out / f"gen{g}")
        previous = str(out / f"gen{g}")
    models: dict[str, Any] = {}
    if status == "completed":
        scores = _ensemble(configs, folders, rt, build)
        for g, folder in enumerate(folders, start=1):
            models[f"gen{g}"] = _selected(read_summary(folder))
        models["ensemble"] = {"test": _keep(scores["test"]["ensemble"]) if "test" in scores else None,
                              "val_best": _keep(scores["val"]["ensemble"] | {"epoch": None})}
        models["student"] = models[f"gen{count}"]  # the born-again student: the last generation
    summary_out = {"status": status, "reason": reason, "algo": cfg.algo, "dataset": cfg.dataset,
                   "objective": entries[-1]["objective"] if entries else None, "generations": entries,
                   "models": models,
                   "epochs_completed": cfg.epochs if status == "completed" else None,
                   "train_seconds": sum(float(read_summary(f).get("train_seconds") or 0.0) for f in folders),
                   **_costs(folders)}
    summary_out = dict(clean(summary_out))
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        config_mod.save(cfg, out / "config.yaml")
        if folders:  # the last completed generation's manifest and rows stand for the run's
            last = folders[-1]
            manifest = json.loads((last / "manifest.json").read_text())
            atomic_write_json(out / "manifest.json", manifest | {"generations": [f.name for f in folders]})
            atomic_write_text(out / "metrics.jsonl", (last / "metrics.jsonl").read_text())
        atomic_write_json(out / "summary.json", summary_out)
    return summary_out
