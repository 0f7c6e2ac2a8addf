"""Aggregating run directories: mean ± std over seeds per cell, ``report.md``, ``results.csv`` and figures.

Runs are found recursively (sweep folders and plain run folders alike) and grouped into *cells* by
their resolved config minus the seed keys and the keys that only steer the machine. A cell's label
names only what varies between cells (``algo=kd, temperature=4``). For every cell the report gives
mean, sample standard deviation and n over its runs of the test metrics at each student's
best-on-val epoch (``summary.json``'s ``test``) and at the last epoch (``test_last``), plus the
training time and throughput. A cohort (DML, DML_e) is shown twice: the mean of its students and
the ensemble that averages their probabilities.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from distillistic.config.yaml_files import MAX_YAML_BYTES
from distillistic.deploy.report import markdown_section as export_section
from distillistic.errors import UserError, short_repr
from distillistic.experiments.comparison import comparison_section, cost_columns, entries, pareto_caption
from distillistic.experiments.cost_view import AXES, DEFAULT_AXIS, si
from distillistic.experiments.grid import SEED_KEYS, comparable, value_text
from distillistic.experiments.results import (
    Group,
    Run,
    _sort_key,
    _text,
    mapping,
    mean_std,
    minimal_labels,
    number,
    pm,
    varying_keys,
)
from distillistic.fileio import atomic_write_text

METRICS = ("top1", "top5", "ece", "nll", "entropy", "brier")
PERCENT = ("top1", "top5", "ece")  # shown in % in report.md; results.csv keeps fractions
PARTS = {"test": "best-on-val epoch", "test_last": "last epoch"}
ALGO_ORDER = ("baseline", "kd", "dml", "dml_e", "tfkd")
# libyaml's safe loader where PyYAML was built with it: the same objects as yaml.safe_load (only the scanner and
# parser are C), about ten times faster; a report of a large sweep reads one config.yaml per run
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --- finding and reading runs --------------------------------------------------------------------------


def _read_run(folder: Path) -> Run:
    """Read a run folder or raise ``ValueError`` saying why it cannot be used."""
    if not (folder / "summary.json").is_file():
        raise ValueError("no summary.json: still running, or stopped before writing one")
    config_file = folder / "config.yaml"  # within a config file's bound (config/yaml_files.py), as a run writes it
    if config_file.is_file() and config_file.stat().st_size > MAX_YAML_BYTES:
        raise ValueError(f"config.yaml is larger than {MAX_YAML_BYTES >> 20} MiB, more than any run writes")
    try:
        summary = json.loads((folder / "summary.json").read_text())
        config = yaml.load(config_file.read_text(), Loader=SAFE_LOADER)
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as e:
        raise ValueError(f"unreadable ({type(e).__name__})") from None
    if not isinstance(summary, dict) or not isinstance(config, dict):
        raise ValueError("summary.json or config.yaml is not a mapping")
    if summary.get("status") != "completed":
        raise ValueError(f"status {short_repr(summary.get('status'))}, not completed")
    _check_shape(summary, config)
    history = []
    metrics = folder / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                history.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash; the rest is still good
    return Run(folder, config, summary, history)


def _check_shape(summary: dict[str, Any], config: dict[str, Any]) -> None:
    """Refuse (ValueError) a completed-looking run whose files lack what the report reads."""
    models = summary.get("models")
    if not isinstance(models, dict) or not models or not all(isinstance(m, dict) for m in models.values()):
        raise ValueError("summary.json has no 'models' mapping")
    for name, entry in models.items():
        test = entry.get("test")
        if test is not None and not (isinstance(test, dict) and all(
                isinstance(test.get(k), int | float) and not isinstance(test.get(k), bool) for k in ("top1", "ece"))):
            raise ValueError(f"summary.json: the test metrics of {short_repr(name)} are not numbers")
    if not isinstance(config.get("algo"), str) or not isinstance(config.get("seed", 0), int):
        raise ValueError("config.yaml has no algorithm or a seed that is not a whole number")


def find_runs(dirs: Sequence[str | Path]) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Completed runs under ``dirs`` (recursively) and the run folders left out, with the reason."""
    runs: dict[Path, Run] = {}
    skipped: list[tuple[Path, str]] = []
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            raise UserError(f"report: '{root}' is not a directory; pass sweep or run directories")
        for here, subdirs, files in os.walk(root):
            folder = Path(here)
            if "summary.json" in files or ("config.yaml" in files and "metrics.jsonl" in files):
                subdirs[:] = []  # a run folder holds no further runs
                try:
                    run = _read_run(folder)
                except ValueError as e:
                    if not is_cached_teacher(folder):
                        skipped.append((folder, str(e)))
                    continue
                if is_cached_teacher(folder, run.config) and folder != root:
                    continue  # a teacher trained first into the cache (a demo's or a sweep's): not a cell
                variant = variant_name(folder)
                if variant is not None:
                    run.config = {**run.config, "variant": variant}
                runs.setdefault(folder.resolve(), run)
            else:
                subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
    if not runs:
        where = ", ".join(str(d) for d in dirs)
        why = (f" ({len(skipped)} run folders were not completed; '{skipped[0][0]}': {skipped[0][1]})"
               if skipped else "")
        raise UserError(f"report: no completed run directories (with summary.json) under {where}{why}; "
                        "pass the --out of 'distillistic sweep' or of 'distillistic train'")
    return list(runs.values()), skipped


def is_cached_teacher(folder: Path, config: Mapping[str, Any] | None = None) -> bool:
    """Whether ``folder`` is a teacher trained first into a cache (``<cache_dir>/teachers/<arch>-<hash>``)."""
    if config is None:
        try:
            config = yaml.load((folder / "config.yaml").read_text(), Loader=SAFE_LOADER) or {}
        except (OSError, yaml.YAMLError):
            return False
    if not isinstance(config, Mapping) or not config.get("out"):
        return False
    cache = config.get("cache_dir") or os.environ.get("DISTILLISTIC_CACHE") or "~/.cache/distillistic"
    teachers = (Path(cache).expanduser() / "teachers").resolve()
    out = Path(str(config["out"])).expanduser()
    moved = folder.parent.name == out.parent.name == "teachers" and folder.name == out.name  # relative paths
    return moved or out.resolve().parent == teachers


def variant_name(folder: Path) -> str | None:
    """The name a sweep (or the demo) gave this run's cell in its ``plan.json`` (``variants:``), or None."""
    for depth, plan_dir in enumerate([folder.parent, folder.parent.parent]):
        plan = plan_dir / "plan.json"
        if not plan.is_file():
            continue
        try:
            cells = json.loads(plan.read_text()).get("cells", [])
        except (OSError, ValueError, AttributeError):
            return None
        name = folder.name if depth == 0 else f"{folder.parent.name}/{folder.name}"
        for cell in cells if isinstance(cells, list) else []:
            if isinstance(cell, dict) and cell.get("name") == name:
                variant = (cell.get("settings") or {}).get("variant")
                return str(variant) if variant is not None else None
    return None


# --- cells and their labels ----------------------------------------------------------------------------


def group_runs(runs: Iterable[Run]) -> list[Group]:
    """Cells: runs with the same config up to the seeds, in a stable order (algorithm, then the varying keys)."""
    groups: dict[str, Group] = {}
    for run in runs:
        settings = {k: v for k, v in comparable(run.config).items() if k not in SEED_KEYS}
        groups.setdefault(_text(settings), Group(settings, [])).runs.append(run)
    ordered = list(groups.values())
    keys = varying_keys([g.settings for g in ordered])

    def order(g: Group) -> tuple[Any, ...]:
        algo = g.settings.get("algo")
        return (ALGO_ORDER.index(algo) if algo in ALGO_ORDER else len(ALGO_ORDER), str(algo),
                *(_sort_key(g.settings.get(k)) for k in keys))

    ordered.sort(key=order)
    for g, label in zip(ordered, minimal_labels([g.settings for g in ordered])):
        g.label = label
        g.runs.sort(key=lambda r: (_sort_key(r.config.get("seed")), _sort_key(r.config.get("data_seed"))))
    return ordered


# --- statistics ----------------------------------------------------------------------------------------


def cell_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """One row per cell and model kind: mean/std of every metric at both epochs, time and throughput."""
    varying = varying_keys([g.settings for g in groups])
    rows = []
    for g in groups:
        for kind in dict.fromkeys(k for r in g.runs for k in r.kinds):
            runs = [r for r in g.runs if kind in r.kinds]
            row: dict[str, Any] = {"label": g.label, "model": kind, "n": len(runs), "seeds": g.seeds}
            row |= {k: config_value(g.settings.get(k)) for k in varying}
            for part in PARTS:
                for m in METRICS:
                    mean, std, _ = mean_std((r.metrics(kind, part) or {}).get(m) for r in runs)
                    row[f"{part}_{m}_mean"], row[f"{part}_{m}_std"] = mean, std
            row["best_epoch_mean"] = mean_std(r.best_epoch() for r in runs)[0]
            for key, name in (("train_seconds", "train_seconds"), ("train_images_per_second", "images_per_second")):
                row[f"{name}_mean"], row[f"{name}_std"], _ = mean_std(r.summary.get(key) for r in runs)
            rows.append(row)
    for row, entry in zip(rows, entries(groups)):  # the same cells and kinds, in the same order
        row |= cost_columns(entry)
        row["runs"] = ";".join(str(r.path) for r in entry.runs)
    return rows


def config_value(value: Any) -> Any:
    return value_text(value) if isinstance(value, list | bool) or value is None else value


def teacher_rows(runs: Iterable[Run]) -> list[dict[str, Any]]:
    """The frozen teachers the runs distilled from (one row per distinct weights), with their test metrics."""
    seen: dict[str, dict[str, Any]] = {}
    for r in runs:
        models = mapping(r.summary.get("models"))
        # ``teacher``, or ``teacher0``, ``teacher1``… for a run with several teachers
        for name in [k for k in models if re.fullmatch(r"teacher\d*", k)]:
            t = mapping(models[name])
            if mapping(t.get("test")):
                source = str(t.get("source"))
                trained = mapping(mapping(mapping(r.summary.get("costs")).get(name)).get("training_cost"))
                seen.setdefault(source, {"teacher": t.get("arch"), "source": source, "runs": 0, **t["test"],
                                         "train_flops": trained.get("train_flops"),
                                         "train_seconds": trained.get("train_seconds")})
                seen[source]["runs"] += 1
    return list(seen.values())


# --- the old table API (used by ``distillistic demo``) --------------------------------------------------


def finished_summary(run: Path) -> dict[str, Any]:
    """A finished run's ``summary.json``; one line (:class:`UserError`) when it is missing or unreadable (unlike
    :func:`distillistic.runs.rundir.read_summary`, which reads a run still going as ``{}``)."""
    path = run / "summary.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise UserError(f"'{path}' is missing or unreadable ({type(e).__name__}); is '{run}' a finished run?") from None


def student_metrics(summary: Mapping[str, Any], part: str = "test") -> dict[str, float] | None:
    """The students' metrics of a run: the single student's, or the cohort's mean over its students."""
    if "cohort_mean" in summary:
        return summary["cohort_mean"].get(part)
    return summary["models"].get("student", {}).get(part)


def summarize_runs(groups: Mapping[str, Sequence[Path]], part: str = "test") -> list[dict[str, Any]]:
    """One row per named group of runs (e.g. one algorithm over seeds): mean and std of each metric."""
    rows = []
    for label, runs in groups.items():
        summaries = [finished_summary(r) for r in runs]
        cohort = any("cohort_mean" in s for s in summaries)
        views = [(f"{label} (cohort mean)", student_metrics), (f"{label} (ensemble)", _ensemble)] if cohort else [
            (label, student_metrics)]
        for name, pick in views:
            metrics = [m for m in (pick(s, part) for s in summaries) if m]
            row: dict[str, Any] = {"label": name, "n": len(metrics)}
            for key in METRICS:
                row[key], row[f"{key}_std"], _ = mean_std([m.get(key) for m in metrics])
            rows.append(row)
    return rows


def _ensemble(summary: Mapping[str, Any], part: str = "test") -> dict[str, float] | None:
    return (summary.get("models", {}).get("ensemble") or {}).get(part)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: algorithm, test top-1 mean ± std, ECE, NLL, entropy (cohorts: mean over students)."""
    lines = ["| algorithm | n | test top-1 (%) | ECE (%) | NLL | entropy (nats) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['n']} | {pm(r['top1'], r['top1_std'], 100)} | "
                     f"{pm(r['ece'], r['ece_std'], 100)} | {pm(r['nll'], r['nll_std'], 1, 3)} | "
                     f"{pm(r['entropy'], r['entropy_std'], 1, 3)} |")
    return "\n".join(lines)


# --- writing the report -----------------------------------------------------------------------------------


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()})


def _cells_table(rows: Sequence[Mapping[str, Any]], part: str, cost: bool) -> list[str]:
    head = ["cell", "model", "n", "top-1 (%)", "top-5 (%)", "ECE (%)", "NLL", "entropy (nats)", "Brier"]
    if cost:
        head += ["best epoch", "train time (s)", "images/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["label"], r["model"], str(r["n"])]
        for m in METRICS:
            scale, digits = (100.0, 2) if m in PERCENT else (1.0, 3)
            cells.append(pm(r[f"{part}_{m}_mean"], r[f"{part}_{m}_std"], scale, digits))
        if cost:
            epoch = r["best_epoch_mean"]
            cells += [f"{epoch:.1f}" if math.isfinite(epoch) else "–",
                      pm(r["train_seconds_mean"], r["train_seconds_std"], 1, 1),
                      pm(r["images_per_second_mean"], r["images_per_second_std"], 1, 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(dirs: Sequence[str | Path], groups: Sequence[Group], rows: Sequence[Mapping[str, Any]],
             teachers: Sequence[Mapping[str, Any]], skipped: Sequence[tuple[Path, str]],
             figures: Sequence[tuple[str, Path]], out: Path, comparison: Sequence[str] = ()) -> str:
    """The text of ``report.md``."""
    n_runs = sum(len(g.runs) for g in groups)
    lines = ["# Results", "",
             f"{n_runs} completed runs in {len(groups)} cells, from {', '.join(f'`{d}`' for d in dirs)}.",
             "Each entry is the mean ± sample standard deviation over a cell's runs (seeds); n is the number of "
             "runs. Test split only; every model was selected on the validation split carved from train. ECE uses "
             "15 equal-width confidence bins. A cohort (DML, DML_e) is shown as *cohort mean* (its students' "
             "metrics averaged in each run) and as *ensemble* (their probabilities averaged).", ""]
    if skipped:
        lines += [f"Not included ({len(skipped)}): " + "; ".join(f"`{p}` ({why})" for p, why in skipped), ""]
    shared = {k: v for k, v in groups[0].settings.items() if k not in varying_keys([g.settings for g in groups])}
    lines += ["<details><summary>Settings shared by every cell</summary>", "",
              ", ".join(f"`{k}={value_text(v)}`" for k, v in shared.items()), "", "</details>", ""]
    for part, title in PARTS.items():
        lines += [f"## Test metrics at the {title}", "", *_cells_table(rows, part, cost=part == "test"), ""]
        if part == "test":
            lines += comparison
    if teachers:
        lines += ["## Teachers", "", "| teacher | weights | runs | top-1 (%) | ECE (%) | NLL | entropy (nats) | "
                  "own training FLOPs | own training s |", "|" + " --- |" * 9]
        for t in teachers:
            flops, secs = (float(v) if number(v) else math.nan for v in (t["train_flops"], t["train_seconds"]))
            lines.append(f"| {t['teacher']} | `{t['source']}` | {t['runs']} | {100 * t['top1']:.2f} | "
                         f"{100 * t['ece']:.2f} | {t['nll']:.3f} | {t['entropy']:.3f} | {si(flops)} | "
                         f"{pm(secs, math.nan, 1.0, 1)} |")
        lines.append("")
    lines += export_section([Path(d) for d in dirs])  # ONNX exports of these runs, when there are some
    lines += ["## Figures", ""]
    for caption, path in figures:
        lines += [f"### {caption}", "", f"![{caption}]({path.relative_to(out).as_posix()})", ""]
    lines += ["Per-cell numbers with every varying setting as a column: `results.csv` (fractions, not %).", ""]
    return "\n".join(lines)


def write_report(dirs: Sequence[str | Path], out: str | Path | None = None, axis: str = DEFAULT_AXIS,
                 reference: str | None = None) -> Path:
    """Aggregate the runs under ``dirs`` into ``out`` (default ``DIR/report``); return ``out``.

    Writes ``report.md``, ``results.csv`` and ``figures/*.png`` (regenerated each time), with the Pareto
    figure against the cost ``axis`` and paired differences to the cell named ``reference`` (default: the
    baseline, where there is one; a name given that no cell has is refused).
    """
    from distillistic.experiments import plots
    from distillistic.experiments.pareto_plot import pareto_figure

    if not dirs:
        raise UserError("report: pass at least one sweep or run directory")
    if out is None:
        if len(dirs) > 1:
            raise UserError("report: pass --out REPORT_DIR when reporting several directories")
        out = Path(dirs[0]) / "report"
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"report: --out '{out}' is a file; choose a directory")
    if axis not in AXES:
        raise UserError(f"report: --x must be one of {', '.join(AXES)}, not {short_repr(axis)}")
    runs, skipped = find_runs(dirs)
    groups = group_runs(runs)
    if reference is not None and not any(reference in (g.settings.get("variant"), g.label, g.settings.get("algo"))
                                         for g in groups):
        raise UserError(f"report: --reference {short_repr(reference)} names no cell; choose a variant, label or "
                        f"algorithm of: {', '.join(g.label for g in groups)}")
    rows = cell_rows(groups)
    teachers = teacher_rows(runs)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for old in fig_dir.glob("*.png"):
        old.unlink()  # figures of an earlier report that may no longer apply
    figures = plots.draw_all(groups, teachers, fig_dir)
    front = pareto_figure(entries(groups), axis, fig_dir / f"pareto-{axis}.png")
    figures += [(pareto_caption(axis), front)] if front is not None else []
    write_csv(rows, out / "results.csv")
    comparison = comparison_section(groups, axis, reference or "baseline")
    atomic_write_text(out / "report.md", markdown(dirs, groups, rows, teachers, skipped, figures, out, comparison))
    return out
