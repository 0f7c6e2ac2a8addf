"""The report's comparison: Holm's correction, paired differences, the Pareto front, cost columns, torch-free report.

Known answers: Holm's adjusted p values of the textbook example (Holm 1979's procedure as Wikipedia's
"Holm–Bonferroni method" works it: p = 0.01, 0.04, 0.03, 0.005 give 0.03, 0.06, 0.06, 0.02); the paired
t test's p value from the closed-form t distribution with 2 degrees of freedom; the percentile bootstrap
interval of 3 differences, whose extreme resample means each carry 1/27 > 2.5 % of the mass.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from distillistic.experiments.comparison import entries, pareto_marks
from distillistic.experiments.cost_view import model_cost, pareto, run_cost, si
from distillistic.experiments.paired import choose_reference, differences, holm, pairs
from distillistic.experiments.report import find_runs, group_runs, write_report
from distillistic.experiments.results import Group, Run

pytestmark = pytest.mark.unit
SRC = Path(__file__).resolve().parents[1] / "src"


def _metrics(top1: float, ece: float) -> dict[str, Any]:
    return {"top1": top1, "top5": 1.0, "ece": ece, "nll": 1.0 - top1, "entropy": 0.1, "brier": 0.1, "n": 100}


def _cost(params: int, flops: int, latency: float) -> dict[str, Any]:
    return {"cost": {"params": params, "flops": flops, "macs": flops // 2, "throughput_images_per_second": 1000.0,
                     "latency_ms": {"median": latency, "p90": 2 * latency, "calls": 30, "batch": 1}}}


def make_run(folder: Path, algo: str, seed: int, top1: float, ece: float = 0.05, train_flops: float = 1e9,
             students: int = 1, teacher_flops: float | None = None, **settings: Any) -> Path:
    """A completed run folder as the report reads it (config.yaml, summary.json), without torch."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"algo": algo, "seed": seed, "data_seed": 0,
                                                        "model": "mlp", **settings}))
    names = ["student"] if students == 1 else [f"student{i}" for i in range(students)]
    models: dict[str, Any] = {n: {"test": _metrics(top1, ece), "val_best": {"epoch": 1}} for n in names}
    costs = {n: _cost(1000, 2000, 0.5) for n in names}
    if teacher_flops is not None:
        models["teacher"] = {"test": _metrics(0.95, 0.02), "arch": "cnn", "source": "/cache/teachers/cnn-1"}
        costs["teacher"] = {"cost": {"params": 9}, "training_cost": {"train_flops": teacher_flops,
                                                                     "train_seconds": 5.0, "shared_by": 1}}
    summary: dict[str, Any] = {"status": "completed", "algo": algo, "models": models, "costs": costs,
                               "train_seconds": 2.0, "train_flops": train_flops}
    if students > 1:
        summary["cohort_mean"] = {"test": _metrics(top1, ece)}
        models["ensemble"] = {"test": _metrics(top1 + 0.01, ece)}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


# --- Holm, the paired test and the bootstrap -------------------------------------------------------------


def test_holm_matches_the_textbook_example() -> None:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.2]) == [0.2]  # one test: nothing to correct
    assert holm([0.6, 0.5]) == [1.0, 1.0]  # capped at 1, and monotone in the sorted order
    out = holm([0.01, math.nan, 0.02])  # NaN: no test, not counted in m
    assert out[0] == pytest.approx(0.02)
    assert math.isnan(out[1])
    assert out[2] == pytest.approx(0.02)


def test_paired_t_test_against_the_closed_form_with_two_degrees_of_freedom() -> None:
    cell, ref = [1.0, 2.0, 3.5], [0.0, 1.2, 2.0]  # differences 1.0, 0.8, 1.5
    d = [a - b for a, b in zip(cell, ref)]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    t = mean / (sd / math.sqrt(3))
    p_closed = 1 - t / math.sqrt(t * t + 2)  # two-sided, t distribution with 2 df: F(t) = 1/2 + t / (2 sqrt(t² + 2))
    result = differences(cell, ref)
    assert result.mean == pytest.approx(1.1)
    assert result.p == pytest.approx(p_closed, rel=1e-9)
    assert result.p == pytest.approx(0.03399691836541928)
    # percentile bootstrap of 3 values: the smallest and largest resample means (0.8, 1.5) each have mass 1/27
    assert (result.low, result.high) == (pytest.approx(0.8), pytest.approx(1.5))
    assert result.excludes_zero


def test_constant_and_absent_differences() -> None:
    same = differences([0.5, 0.6, 0.7], [0.4, 0.5, 0.6])  # every pair +0.1
    assert (same.mean, same.low, same.high, same.p) == (pytest.approx(0.1), pytest.approx(0.1),
                                                        pytest.approx(0.1), 0.0)
    assert same.excludes_zero
    none = differences([0.5, 0.6], [0.5, 0.6])
    assert none.mean == 0.0
    assert math.isnan(none.p)
    assert not none.excludes_zero
    one = differences([0.5], [0.4])
    assert one.n == 1
    assert math.isnan(one.low)
    assert not one.excludes_zero
    noisy = differences([0.5, 0.2, 0.9], [0.4, 0.5, 0.6])  # +0.1, -0.3, +0.3: the interval holds 0
    assert noisy.low < 0 < noisy.high
    assert not noisy.excludes_zero
    with pytest.raises(ValueError, match="one length"):
        differences([1.0], [1.0, 2.0])


def _run(seed: int, top1: float, **config: Any) -> Run:
    return Run(Path("."), {"seed": seed, "data_seed": 0, **config},
               {"models": {"student": {"test": {"top1": top1}}}})


def test_pairs_follow_the_seeds_not_the_order() -> None:
    cell = Group({"algo": "kd"}, [_run(2, 0.7), _run(0, 0.5), _run(1, 0.6), _run(9, 0.1)])
    ref = Group({"algo": "baseline"}, [_run(0, 0.4), _run(1, 0.45), _run(2, 0.5)])
    a, b = pairs(cell, ref, lambda r: (r.metrics("student", "test") or {}).get("top1"))
    assert sorted(zip(a, b)) == [(0.5, 0.4), (0.6, 0.45), (0.7, 0.5)]  # seed 9 has no partner


def test_reference_is_the_baseline_sharing_the_most_settings() -> None:
    groups = [Group({"algo": "baseline", "res": 7}, []), Group({"algo": "baseline", "res": 14}, []),
              Group({"algo": "kd", "res": 14}, []), Group({"algo": "dml"}, [])]
    chosen = choose_reference(groups, "baseline")
    assert chosen[2] is groups[1]
    assert 3 not in chosen
    assert 0 not in chosen


# --- Pareto and costs -------------------------------------------------------------------------------------


def test_pareto_front_of_known_points() -> None:
    points = [(1.0, 0.5), (2.0, 0.7), (2.0, 0.6), (3.0, 0.7), (0.5, 0.4), (math.nan, 0.9)]
    assert pareto(points) == [True, True, False, False, True, False]
    assert pareto([(1.0, 0.5), (1.0, 0.5)]) == [True, True]  # ties dominate neither


def test_costs_of_kinds_and_the_teacher(tmp_path: Path) -> None:
    make_run(tmp_path / "d", "dml", 0, 0.8, students=3, train_flops=3e9)
    make_run(tmp_path / "k", "kd", 0, 0.8, teacher_flops=5e9, teacher="cnn")
    runs, _ = find_runs([tmp_path])
    dml = next(r for r in runs if r.config["algo"] == "dml")
    kd = next(r for r in runs if r.config["algo"] == "kd")
    assert model_cost(dml, "cohort mean", "params") == 1000
    assert model_cost(dml, "ensemble", "params") == 3000
    assert model_cost(dml, "ensemble", "latency") == pytest.approx(1.5)
    assert model_cost(dml, "ensemble", "throughput") == pytest.approx(1000 / 3)
    assert run_cost(dml, "ensemble", "train_flops") == 3e9
    assert run_cost(kd, "student", "train_flops") == 1e9 + 5e9  # the teacher's own training counted in
    assert run_cost(kd, "student", "train_seconds") == 2.0 + 5.0
    assert si(6.72e9) == "6.72 G"
    assert si(math.nan) == "–"
    assert si(12.0) == "12"


# --- the report ---------------------------------------------------------------------------------------------


def _sweep(root: Path) -> Path:
    for seed in (0, 1, 2):
        make_run(root / f"base{seed}", "baseline", seed, 0.80 + seed / 100, train_flops=1e9)
        make_run(root / f"kd{seed}", "kd", seed, 0.82 + seed / 100, teacher_flops=9e9, teacher="cnn")  # +2 pp
        make_run(root / f"dml{seed}", "dml", seed, 0.79 + (0.02 if seed == 1 else 0) + seed / 100,
                 students=2, train_flops=2e9)
    return root


def _comparison_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """The comparison table's rows by (cell, model), as lists of cells."""
    section = text.split("## Comparison", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in section.splitlines() if ln.startswith("| algo=")]
    return {(r[0], r[1]): r for r in rows}


def test_report_has_costs_pareto_marks_and_paired_differences(tmp_path: Path) -> None:
    root = _sweep(tmp_path / "sweep")
    out = write_report([root])
    text = (out / "report.md").read_text()
    assert (out / "figures" / "pareto-train_flops.png").is_file()
    assert "![Pareto front: test top-1 and ECE against training FLOPs" in text
    rows = _comparison_rows(text)
    assert set(rows) == {("algo=baseline", "student"), ("algo=kd", "student"), ("algo=dml", "cohort mean"),
                         ("algo=dml", "ensemble")}
    kd, base, ens = rows[("algo=kd", "student")], rows[("algo=baseline", "student")], rows[("algo=dml", "ensemble")]
    # cell, model, n, top-1, ECE, params, FLOPs/img, latency, train FLOPs, teacher's, train s, Pareto, Δ, p, Δ, p
    assert kd[3] == "83.00 ± 1.00"
    assert kd[5] == "1 k"
    assert kd[6] == "2 k"
    assert kd[7] == "0.500 / 1.000"
    assert kd[8] == "1 G"
    assert kd[9] == "9 G"
    assert kd[10] == "2.0 ± 0.0"
    assert kd[12] == "+2.00 [+2.00, +2.00] ✱"
    assert kd[13] == "< 0.001"
    assert kd[14] == "+0.00 [+0.00, +0.00]"  # the same ECE: no mark
    assert base[12] == "ref."
    assert ens[5] == "2 k"
    assert ens[7] == "1.000 / 2.000"
    assert [r[11] for r in (base, kd, rows[("algo=dml", "cohort mean")], ens)] == ["◆", "◆", "", "◆"]
    # DML's differences +0.00/+2.00 -1.00... vary by seed: an interval, a p value, Holm over 3 compared rows
    cohort = rows[("algo=dml", "cohort mean")]
    assert "[" in cohort[12]
    assert "✱" not in cohort[12]
    assert cohort[13] != "–"
    assert "| cnn | `/cache/teachers/cnn-1` | 3 | 95.00 | 2.00 | 0.050 | 0.100 | 9 G | 5.0 |" in text  # its own line
    with (out / "results.csv").open() as f:
        csv_rows = {(r["label"], r["model"]): r for r in csv.DictReader(f)}
    assert float(csv_rows[("algo=kd", "student")]["train_flops_with_teacher_mean"]) == pytest.approx(1e10)
    assert float(csv_rows[("algo=kd", "student")]["teacher_train_flops_mean"]) == pytest.approx(9e9)
    assert float(csv_rows[("algo=dml", "ensemble")]["params_mean"]) == 2000


def test_kd_on_the_front_when_nothing_beats_it(tmp_path: Path) -> None:
    groups = group_runs(find_runs([_sweep(tmp_path / "s")])[0])
    items = entries(groups)
    marks = {(e.label, e.kind): m for e, m in zip(items, pareto_marks(items, "train_flops"))}
    assert marks == {("algo=baseline", "student"): True, ("algo=kd", "student"): True,
                     ("algo=dml", "cohort mean"): False, ("algo=dml", "ensemble"): True}
    params = {(e.label, e.kind): m for e, m in zip(items, pareto_marks(items, "params"))}
    assert params[("algo=kd", "student")]
    assert not params[("algo=dml", "ensemble")]


def test_report_axis_and_reference_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from distillistic.cli import main

    root = _sweep(tmp_path / "sweep")
    assert main(["report", str(root), "--x", "params", "--reference", "kd"]) == 0
    text = (root / "report" / "report.md").read_text()
    assert (root / "report" / "figures" / "pareto-params.png").is_file()
    assert "paired differences to `kd`" in text
    assert "-2.00 [-2.00, -2.00] ✱" in text  # the baseline against KD
    assert main(["report", str(root), "--reference", "nosuch"]) == 2
    assert "--reference 'nosuch' names no cell" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["report", str(root), "--x", "speed"])
    assert stop.value.code == 2


def test_report_never_imports_torch(tmp_path: Path) -> None:
    root = _sweep(tmp_path / "sweep")
    code = ("import sys\nfrom distillistic.cli import main\nrc = main(['report', sys.argv[1]])\n"
            "assert rc == 0, rc\nassert 'torch' not in sys.modules, 'torch imported'\n")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (root / "report" / "figures" / "pareto-train_flops.png").is_file()


# --- sum-of-parts ---------------------------------------------------------------------------------------------


def test_sum_of_parts_cells_share_one_budget() -> None:
    from distillistic.experiments.sum_of_parts import EPOCHS, variants

    width = {"mlp": 1, "mlp_x2": 2, "mlp_x3": 3}  # parameters (and so FLOPs per image) of 1, 2, 3 mlp students
    for name, cell in variants().items():
        if name == "kd":
            continue  # its teacher's training is measured, not planned: shown in the table
        load = cell["epochs"] * cell.get("students", 1) * width[cell.get("model", "mlp")]
        assert load == 3 * EPOCHS, name


def test_sum_of_parts_table_and_verdict(tmp_path: Path) -> None:
    from distillistic.experiments.sum_of_parts import table

    for seed in (0, 1, 2):
        make_run(tmp_path / f"alone{seed}", "baseline", seed, 0.80 + seed / 100, variant="alone")
        make_run(tmp_path / f"dml3{seed}", "dml", seed, 0.83 + seed / 100, students=3, variant="dml3")
        make_run(tmp_path / f"indep3{seed}", "baseline", seed, 0.78 + seed / 100, students=3, variant="indep3")
        make_run(tmp_path / f"wide3{seed}", "baseline", seed, 0.81 + seed / 100, variant="wide3")
        make_run(tmp_path / f"kd{seed}", "kd", seed, 0.79 + seed / 100, teacher_flops=5e9, variant="kd")
    lines, verdict = table(group_runs(find_runs([tmp_path])[0]))
    rows = {tuple(c.strip() for c in ln.strip("|").split("|")[:2]): ln for ln in lines if ln.startswith("| ")}
    assert ("indep3", "cohort mean") not in rows  # one independent student is no comparison of its own
    assert "+3.00 [+3.00, +3.00] ✱" in rows[("dml3", "cohort mean")]
    assert "| 6 G |" in rows[("kd", "student")]  # 1 G of its own and 5 G of its teacher's training
    assert "ref." in rows[("alone", "student")]
    assert "(dml3: 84.00 %) beats one student given the whole budget (81.00 %; beyond the seeds' noise" in verdict
    assert "KD with its teacher's training) it beats wide3, kd beyond the seeds' noise (wide3 82.00 %, Δ +2.00 " \
           "[+2.00, +2.00] pp; kd 80.00 %, Δ +4.00 [+4.00, +4.00] pp)" in verdict
    assert "(dml3: 85.00 %) against the best ensemble of independent students (indep3: 80.00 %): greater, " \
           "beyond the seeds' noise (Δ +5.00 [+5.00, +5.00] pp" in verdict
    assert verdict.endswith("the cohort is greater than the sum of its parts here, at its cost.")


def test_several_cells_named_like_the_reference_say_which_one(tmp_path: Path) -> None:
    for seed in (0, 1, 2):
        make_run(tmp_path / f"bm{seed}", "baseline", seed, 0.80, model="mlp")
        make_run(tmp_path / f"bc{seed}", "baseline", seed, 0.90, model="cnn")
        make_run(tmp_path / f"kc{seed}", "kd", seed, 0.91, model="cnn", teacher="cnn_wide")
    rows = _comparison_rows((write_report([tmp_path], tmp_path / "rep") / "report.md").read_text())
    kd = next(r for (cell, _), r in rows.items() if cell.startswith("algo=kd"))
    assert kd[12] == "+1.00 [+1.00, +1.00] ✱ (vs algo=baseline, model=cnn)"  # the baseline of its own model
