"""``distillistic reproduce``: the claims' tables read the right numbers and say plainly whether a claim held."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from _util import run_cli
from distillistic.experiments import claim_tables as tables
from distillistic.experiments import reproduce as rp
from distillistic.experiments.results import Group, Run


def _run(label_seed: int, top1: float, conf: float, history: list[dict[str, Any]] | None = None,
         cohort: bool = False, **config: Any) -> Run:
    test = {"top1": top1, "ece": abs(conf - top1), "nll": 0.3, "entropy": 0.5,
            "reliability": {"count": [0, 10], "accuracy": [0.0, top1], "confidence": [0.0, conf]}}
    models = {"student0" if cohort else "student": {"test": test}}
    summary: dict[str, Any] = {"status": "completed", "models": models}
    if cohort:
        summary["cohort_mean"] = {"test": test}
    return Run(Path("."), {"seed": label_seed, **config}, summary, history or [])


def test_smoothing_table_reads_the_confidence_gap_and_its_sign() -> None:
    smooth = Group({"algo": "tfkd", "virtual_smooth": True},
                   [_run(s, 0.90, 0.80 - s / 100, algo="tfkd") for s in range(3)], "algo=tfkd, virtual_smooth=true")
    calib = Group({"algo": "tfkd", "virtual_smooth": False},
                  [_run(s, 0.90, 0.91, algo="tfkd") for s in range(3)], "algo=tfkd, virtual_smooth=false")
    lines, verdict = tables.smoothing([smooth, calib])
    assert "-11.00 ± 1.00" in "\n".join(lines)  # confidence 0.80, 0.79, 0.78 at accuracy 0.90: 10-12 pp under
    # Every seed's gap is below 0 and every calibrated |gap| (1 pp) below the smoothed one's (10-12 pp): with 3
    # seeds the percentile interval runs from the smallest to the largest difference, so both exclude 0.
    assert "under-confident, beyond the seeds' noise (Δ -11.00 [-12.00, -10.00] pp" in verdict
    assert "minus the smoothed one's: beyond the seeds' noise (Δ -10.00 [-11.00, -9.00] pp" in verdict
    assert "the claim holds" in verdict
    # Swap the two: the smoothed teacher is now the calibrated one, and the verdict says the claim failed.
    smooth.runs, calib.runs = calib.runs, smooth.runs
    assert "does not hold" in tables.smoothing([smooth, calib])[1]


def test_smoothing_within_noise_does_not_hold() -> None:
    """The calibrated students closer to calibration on average, but not on every seed: within the noise."""
    smooth = Group({"algo": "tfkd", "virtual_smooth": True},
                   [_run(s, 0.90, c, algo="tfkd") for s, c in enumerate((0.85, 0.80, 0.88))], "tfkd_smoothed")
    calib = Group({"algo": "tfkd", "virtual_smooth": False},  # |gaps| 0.01, 0.01, 0.04 against 0.05, 0.10, 0.02
                  [_run(s, 0.90, c, algo="tfkd") for s, c in enumerate((0.89, 0.91, 0.86))], "tfkd_calibrated")
    verdict = tables.smoothing([smooth, calib])[1]
    assert "minus the smoothed one's: within the seeds' noise (Δ -3.67 [-9.00, +2.00] pp" in verdict
    assert "the claim does not hold" in verdict


def _history(vals: list[float], kl: float | None) -> list[dict[str, Any]]:
    rows = [{"split": "val", "model": "student0", "top1": v, "epoch": e} for e, v in enumerate(vals)]
    if kl is not None:
        rows.append({"split": "train", "model": "cohort", "pairwise_kl": kl})
    return rows


def test_instability_measures_epoch_to_epoch_changes_and_peer_disagreement() -> None:
    dml = Group({"algo": "dml"}, [_run(s, 0.9, 0.9, _history([0.5, 0.7 + s / 100, 0.6], 0.2), cohort=True)
                                  for s in range(3)], "dml")
    kd = Group({"algo": "kd"}, [_run(s, 0.9, 0.9, _history([0.5, 0.55, 0.6], None)) for s in range(3)], "kd")
    pcl_rows = _history([0.5, 0.6, 0.65], 0.1) + [  # the EMA copy's rows do not count: smooth by construction
        {"split": "val", "model": "student0_ema", "top1": v, "epoch": e} for e, v in enumerate([0.1, 0.9, 0.1])]
    pcl = Group({"algo": "pcl"}, [_run(s, 0.9, 0.9, pcl_rows, cohort=True) for s in range(3)], "pcl")
    assert tables.oscillation(dml.runs[0]) == pytest.approx(0.15)  # (0.2 + 0.1) / 2
    assert tables.oscillation(dml.runs[2]) == pytest.approx(0.17)  # (0.22 + 0.12) / 2
    assert tables.oscillation(kd.runs[0]) == pytest.approx(0.05)
    assert tables.oscillation(pcl.runs[0]) == pytest.approx(0.075)
    lines, verdict = tables.instability([kd, dml, pcl])
    rows = {ln.split(" | ")[0][2:]: ln for ln in lines if ln.startswith("| ")}
    assert "| ref. | – | ref. | – |" in rows["kd"]
    assert "+11.00 [+10.00, +12.00] ✱" in rows["dml"]  # 0.15, 0.16, 0.17 against 0.05 on every seed
    assert "DML's students move 16.00 pp per epoch on val against KD's 5.00" in verdict
    assert "DML is less stable than KD here, the difference being beyond the seeds' noise (Δ +11.00" in verdict
    assert "PCL's students move 7.50 pp: its mean teachers steady the cohort (PCL minus DML: beyond" in verdict
    # KD's students oscillating as much as DML's on one seed, less on another: within the noise.
    kd.runs = [_run(s, 0.9, 0.9, _history([0.5, 0.5 + d, 0.6], None)) for s, d in enumerate((0.3, 0.1, 0.0))]
    verdict = tables.instability([kd, dml, pcl])[1]
    assert "DML is not clearly less stable than KD here, the difference being within the seeds' noise" in verdict


def test_hinton_verdict_says_when_kd_does_not_win() -> None:
    base = Group({"algo": "baseline"}, [_run(s, 0.95, 0.95) for s in range(3)], "baseline")
    kd = Group({"algo": "kd"}, [_run(s, 0.93, 0.93) for s in range(3)], "kd")
    lines, verdict = tables.hinton([base, kd])
    assert "does not beat" in verdict
    assert "| kd | 93.00 ± 0.00 | 0.00 ± 0.00 | 0.30 ± 0.00 | -2.00 [-2.00, -2.00] ✱ | < 0.001 |" in "\n".join(lines)
    kd.runs = [_run(s, 0.97, 0.97) for s in range(3)]
    assert "beats the student trained alone here (97.00 vs 95.00 %" in tables.hinton([base, kd])[1]
    assert "does not" not in tables.hinton([base, kd])[1]
    # Better on average (+1 pp) but worse on one seed: the interval holds 0, KD is not said to win.
    kd.runs = [_run(s, 0.95 + d, 0.95 + d) for s, d in enumerate((0.03, 0.01, -0.01))]
    verdict = tables.hinton([base, kd])[1]
    assert "KD does not beat the student trained alone" in verdict
    assert "within the seeds' noise (Δ +1.00 [-1.00, +3.00] pp" in verdict


def test_cross_quality_pairs_each_cell_with_the_baseline_of_its_size() -> None:
    def cell(algo: str, px: int, top1s: tuple[float, ...]) -> Group:
        return Group({"algo": algo, "student_resolution": px},
                     [_run(s, t, t, algo=algo) for s, t in enumerate(top1s)], f"{algo}, student_resolution={px}")

    groups = [cell("baseline", 7, (0.90, 0.91, 0.92)), cell("kd", 7, (0.91, 0.90, 0.93)),  # +1, -1, +1
              cell("baseline", 14, (0.80, 0.81, 0.82)), cell("kd", 14, (0.92, 0.93, 0.94))]  # +12 on each seed
    lines, verdict = tables.cross_quality(groups)
    rows = {ln.split(" | ")[0][2:]: ln for ln in lines if ln.startswith("| ")}
    assert "| +0.33 [-1.00, +1.00] |" in rows["kd, student_resolution=7"]  # paired with the 7 px baseline
    assert "| +12.00 [+12.00, +12.00] ✱ |" in rows["kd, student_resolution=14"]  # and not with the 7 px one
    assert "beats the student alone beyond the seeds' noise at 1 of 2 student sizes (7 px: within" in verdict


def test_every_claim_expands_into_valid_cells() -> None:
    from distillistic.experiments.grid import expand

    for claim in rp.CLAIMS.values():
        if claim.measure is not None:  # measured directly, not by a sweep
            continue
        plan = expand(rp.sweep_spec(claim, overrides={"dataset": "digits"}))
        axes = math.prod(len(v) for v in (claim.grid or {}).values())
        assert len(plan.cells) == len(claim.variants) * len(rp.SEEDS) * axes


@pytest.mark.e2e
@pytest.mark.slow
def test_reproduce_runs_a_claim_end_to_end(tmp_path: Path) -> None:
    text = rp.reproduce("tfkd-smoothing", tmp_path, overrides={"dataset": "digits", "epochs": 1})
    assert text.startswith("## tfkd-smoothing")
    assert (tmp_path / "tfkd-smoothing" / "claim.md").read_text() == text
    assert (tmp_path / "tfkd-smoothing" / "report" / "report.md").is_file()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "seeds" not in line]
    assert sorted(r.split(" | ")[0][2:] for r in rows) == ["baseline", "tfkd_calibrated", "tfkd_smoothed"]


def test_cli_lists_claims_and_refuses_unknown_ones(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, out, _ = run_cli(["reproduce", "list"], capsys)
    assert rc == 0
    assert all(name in out for name in rp.CLAIMS)
    rc, _, err = run_cli(["reproduce", "hintn", "--out", str(tmp_path)], capsys)
    assert rc == 2
    assert len(err) == 1
    assert "unknown claim 'hintn'" in err[0]
    rc, _, err = run_cli(["reproduce", "hinton", "--data-root", str(tmp_path), "--out", str(tmp_path)], capsys)
    assert rc == 2
    assert len(err) == 1
    assert "holds no MNIST t10k files" in err[0]


@pytest.mark.e2e
@pytest.mark.slow
def test_dml_identity_claim_agrees_in_float64_and_shows_the_float32_gap(tmp_path: Path) -> None:
    # batches of 16, not the claim's 64: the same five steps of three ResNet-18s, at a quarter of the cost
    text = rp.reproduce("dml-equals-dml-e", tmp_path, overrides={"dataset": "digits", "batch_size": 16})
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r[0][2:]) for r in rows] == [1, 2, 3, 4, 5]
    exact = [float(r[1]) for r in rows]
    rounded = [float(r[2].rstrip(" |")) for r in rows]
    assert max(exact) < 1e-9  # the identity: equal gradients, so equal trajectories up to float64 rounding
    assert rounded[-1] > 1e-7  # float32 rounding, amplified by five AdamW steps of a ResNet-18
    assert "is exact" in text


def _kd_run(seed: int, top1: float, ece: float, t_cal: float | None = None) -> Run:
    run = _run(seed, top1, top1 + ece, algo="kd")
    run.summary["models"]["teacher"] = {"test": {"top1": 0.97, "ece": 0.03 if t_cal is None else 0.01}}
    if t_cal is not None:
        run.summary["models"]["teacher"]["calibration_temperature"] = t_cal
    return run


def test_calibrated_teacher_verdict_names_the_temperature_and_what_calibrating_did() -> None:
    raw = Group({"algo": "kd"}, [_kd_run(s, top1, 0.02) for s, top1 in enumerate((0.90, 0.91, 0.92))], "kd")
    cal = Group({"algo": "kd", "teacher_calibration": "temperature"},
                [_kd_run(s, top1, 0.02, t_cal=1.6) for s, top1 in enumerate((0.94, 0.95, 0.96))], "kd_calibrated")
    lines, verdict = tables.calibrated_teacher([raw, cal])
    table = "\n".join(lines)
    assert "| kd_calibrated | 1.60 ± 0.00 | 1.00 ± 0.00 | 95.00 ± 1.00 | 2.00 ± 0.00 | 0.30 ± 0.00 | " \
           "+4.00 [+4.00, +4.00] ✱ | < 0.001 | +0.00 [+0.00, +0.00] | – |" in table
    assert "| kd | – | 3.00 ± 0.00 | 91.00 ± 1.00 | 2.00 ± 0.00 | 0.30 ± 0.00 | ref. | – | ref. | – |" in table
    assert "fitted temperature is 1.60 (over-confident" in verdict
    assert "difference in test top-1 is beyond the seeds' noise (Δ +4.00 [+4.00, +4.00] pp" in verdict
    assert "helped accuracy" in verdict  # +4 pp on every seed
    assert "made no difference beyond the seeds' noise to calibration" in verdict  # ECE equal
    # +1.5, -0.5, +0.5 pp: better on average, not on every seed: no effect claimed
    cal.runs = [_kd_run(s, top1, 0.02, t_cal=1.6) for s, top1 in enumerate((0.915, 0.905, 0.925))]
    verdict = tables.calibrated_teacher([raw, cal])[1]
    assert "made no difference beyond the seeds' noise to accuracy" in verdict
    assert "within the seeds' noise (Δ +0.50 [-0.50, +1.50] pp" in verdict
    cal.runs = [_kd_run(s, top1, 0.02, t_cal=1.6) for s, top1 in enumerate((0.85, 0.86, 0.87))]
    assert "hurt accuracy" in tables.calibrated_teacher([raw, cal])[1]


@pytest.mark.e2e
@pytest.mark.slow
def test_calibrated_teacher_trains_its_own_teacher_once_and_every_kd_cell_reads_it(tmp_path: Path) -> None:
    small = {"dataset": "digits", "epochs": 1}
    text = rp.reproduce("calibrated-teacher", tmp_path, overrides=small)
    (teacher,) = (tmp_path / "calibrated-teacher" / "teacher").glob("seed=*")
    assert json.loads((teacher / "summary.json").read_text())["status"] == "completed"
    saved = yaml.safe_load((teacher / "config.yaml").read_text())
    for key, value in rp.OVERCONFIDENT_TEACHER.items():  # its own recipe, the claim's data and overrides beneath
        assert saved[key] == small.get(key, value), key
    for cell in (tmp_path / "calibrated-teacher" / "runs").glob("kd*"):
        cfg = yaml.safe_load((cell / "config.yaml").read_text())
        assert Path(cfg["teacher_weights"]) == teacher.resolve()
    assert "fitted temperature is" in text
    assert "| baseline + temperature scaling |" in text
    again = rp.reproduce("calibrated-teacher", tmp_path, overrides=small)  # finished: nothing trains again
    assert again == text
