"""``distillistic reproduce``: the claims' tables read the right numbers and say plainly whether a claim held."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from _util import run_cli
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
                   [_run(s, 0.90, 0.80, algo="tfkd") for s in range(3)], "algo=tfkd, virtual_smooth=true")
    calib = Group({"algo": "tfkd", "virtual_smooth": False},
                  [_run(s, 0.90, 0.91, algo="tfkd") for s in range(3)], "algo=tfkd, virtual_smooth=false")
    lines, verdict = rp._smoothing([smooth, calib])
    assert "-10.00" in "\n".join(lines)  # confidence 0.80 at accuracy 0.90: 10 pp under-confident
    assert "under-confident (-10.00 pp)" in verdict
    assert "the claim holds" in verdict
    # Swap the two: the smoothed teacher is now the calibrated one, and the verdict says the claim failed.
    smooth.runs, calib.runs = calib.runs, smooth.runs
    assert "does not hold" in rp._smoothing([smooth, calib])[1]


def test_instability_measures_epoch_to_epoch_changes_and_peer_disagreement() -> None:
    def history(vals: list[float], kl: float | None) -> list[dict[str, Any]]:
        rows = [{"split": "val", "model": "student0", "top1": v, "epoch": e} for e, v in enumerate(vals)]
        if kl is not None:
            rows.append({"split": "train", "model": "cohort", "pairwise_kl": kl})
        return rows

    dml = Group({"algo": "dml"}, [_run(0, 0.9, 0.9, history([0.5, 0.7, 0.6], 0.2), cohort=True)], "algo=dml")
    kd = Group({"algo": "kd"}, [_run(0, 0.9, 0.9, history([0.5, 0.55, 0.6], None))], "algo=kd")
    pcl_rows = history([0.5, 0.6, 0.65], 0.1) + [  # the EMA copy's rows do not count: smooth by construction
        {"split": "val", "model": "student0_ema", "top1": v, "epoch": e} for e, v in enumerate([0.1, 0.9, 0.1])]
    pcl = Group({"algo": "pcl"}, [_run(0, 0.9, 0.9, pcl_rows, cohort=True)], "algo=pcl")
    assert rp._oscillation(dml.runs[0]) == pytest.approx(0.15)  # (0.2 + 0.1) / 2
    assert rp._oscillation(kd.runs[0]) == pytest.approx(0.05)
    assert rp._oscillation(pcl.runs[0]) == pytest.approx(0.075)
    _lines, verdict = rp._instability([kd, dml, pcl])
    assert "DML is less stable than KD" in verdict
    assert "15.00" in verdict
    assert "5.00" in verdict
    assert "7.50" in verdict
    assert "mean teachers steady the cohort" in verdict


def test_hinton_verdict_says_when_kd_does_not_win() -> None:
    base = Group({"algo": "baseline"}, [_run(s, 0.95, 0.95) for s in range(2)], "algo=baseline")
    kd = Group({"algo": "kd"}, [_run(s, 0.93, 0.93) for s in range(2)], "algo=kd")
    assert "does not beat" in rp._hinton([base, kd])[1]
    kd.runs = [_run(s, 0.97, 0.97) for s in range(2)]
    assert "beats" in rp._hinton([base, kd])[1]
    assert "does not" not in rp._hinton([base, kd])[1]


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
    lines, verdict = rp._calibrated_teacher([raw, cal])
    table = "\n".join(lines)
    assert "| kd_calibrated | 1.60 ± 0.00 | 1.00 ± 0.00 | 95.00 ± 1.00 | 2.00 ± 0.00 |" in table
    assert "| kd | – | 3.00 ± 0.00 | 91.00 ± 1.00 |" in table  # the raw teacher's ECE beside the calibrated one's
    assert "fitted temperature is 1.60 (over-confident" in verdict
    assert "top-1 by +4.00 pp" in verdict
    assert "helped accuracy" in verdict  # +4 pp against a spread of 1 pp
    assert "made no difference beyond the seeds' spread to calibration" in verdict  # ECE equal
    # within the seeds' spread: no effect claimed
    cal.runs = [_kd_run(s, top1, 0.02, t_cal=1.6) for s, top1 in enumerate((0.905, 0.915, 0.925))]
    assert "made no difference beyond the seeds' spread to accuracy" in rp._calibrated_teacher([raw, cal])[1]
    cal.runs = [_kd_run(s, top1, 0.02, t_cal=1.6) for s, top1 in enumerate((0.85, 0.86, 0.87))]
    assert "hurt accuracy" in rp._calibrated_teacher([raw, cal])[1]


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
