"""Calibration tools end to end: held-out calibration metrics in real runs, ``distillistic calibrate``, a
temperature-scaled teacher, Tf-KD's p from a baseline, and ``--precision fp64`` (DML = DML_e to rounding).

Known answers: the summary's ACE/MCE/classwise ECE/teacher agreement/KL equal a NumPy implementation written here
from the definitions, applied to the run's own test logits; scaling a student's head by ``c`` multiplies the
fitted temperature by exactly ``c``; the calibrated teacher's fitted T equals ``calibrate``'s T of that teacher.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from _torchrun import FOLDER, job, outcome
from _util import run_cli, tiny
from distillistic.errors import ConfigError, UserError
from distillistic.training import setup
from distillistic.training.calibrate import _load, calibrate_run, collect_logits
from distillistic.training.checkpoint import load, save
from distillistic.training.engine import TrainMeters, train_step
from distillistic.training.run import build_task, train
from distillistic.training.runtime import _precision, resolve_runtime

BINS = 15


# --- an independent NumPy implementation of the definitions (float64) ------------------------------------


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _bins(c: np.ndarray) -> np.ndarray:
    """Equal-width bin ``((m-1)/M, m/M]`` of each value, 0 in the first."""
    return np.clip(np.ceil(c * BINS).astype(int), 1, BINS) - 1


def reference(z: np.ndarray, y: np.ndarray, zt: np.ndarray | None = None) -> dict[str, float]:
    p = _softmax(z)
    conf, hit = p.max(axis=1), (p.argmax(axis=1) == y).astype(float)
    n, k = p.shape
    b = _bins(conf)
    gaps = [abs((hit[b == m] - conf[b == m]).mean()) for m in range(BINS) if (b == m).any()]
    order = np.argsort(conf, kind="stable")
    ace = sum(abs((hit[g] - conf[g]).sum()) for g in np.array_split(order, BINS)) / n  # sizes differ by <= 1
    cw = 0.0
    for c in range(k):
        bc = _bins(p[:, c])
        cw += sum(abs(((y[bc == m] == c) - p[bc == m, c]).sum()) for m in range(BINS)) / n
    out = {"ace": ace, "mce": max(gaps), "classwise_ece": cw / k}
    if zt is not None:
        pt = _softmax(zt)
        out["teacher_agreement"] = float((p.argmax(1) == pt.argmax(1)).mean())
        out["teacher_kl"] = float((pt * (np.log(pt) - np.log(p))).sum(axis=1).mean())
    return out


# --- runs shared by the tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    out = tmp_path_factory.mktemp("kd") / "run"
    train(tiny(out, algo="kd", teacher="cnn", teacher_weights="random", cache_dir=str(cache)))
    return out


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    out = tmp_path_factory.mktemp("baseline") / "run"
    train(tiny(out, epochs=2, cache_dir=str(cache)))
    return out


def _summary(run: Path) -> dict[str, Any]:
    return dict(json.loads((run / "summary.json").read_text()))


# --- held-out calibration metrics --------------------------------------------------------------------------


@pytest.mark.e2e
def test_summary_calibration_metrics_equal_the_definitions_on_the_runs_own_logits(kd_run: Path) -> None:
    task = _load(kd_run, "cpu")
    assert task.teacher is not None
    logits, labels = collect_logits(task, [*task.students, task.teacher], "test")
    z, zt, y = logits["student"].numpy(), logits["teacher"].numpy(), labels.numpy()
    models = _summary(kd_run)["models"]
    want = reference(z, y, zt)
    got = models["student"]["test"]
    assert set(want) <= set(got)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=2e-6), key
    # the teacher is not scored against itself; its calibration is
    teacher = models["teacher"]["test"]
    assert "teacher_agreement" not in teacher
    for key, value in reference(zt, y).items():
        assert teacher[key] == pytest.approx(value, abs=2e-6), key
    # the existing keys stay, and every val row of metrics.jsonl carries the new ones
    assert {"top1", "top5", "ece", "nll", "brier", "entropy", "n", "reliability"} <= set(got)
    rows = [json.loads(line) for line in (kd_run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"]
    assert val
    assert all({"ace", "mce", "classwise_ece", "teacher_agreement", "teacher_kl"} <= set(r) for r in val)


# --- distillistic calibrate --------------------------------------------------------------------------------


@pytest.mark.e2e
def test_calibrate_lowers_val_nll_of_an_over_confident_run_and_recovers_the_scale(
        baseline_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = calibrate_run(baseline_run, "cpu")["models"]["student"]
    # The same run made over-confident: the head's weights and bias times c multiply every logit by c.
    c = 4.0
    hot = tmp_path / "hot"
    shutil.copytree(baseline_run, hot)
    (hot / "calibration.json").unlink()
    ckpt = load(hot / "checkpoints" / "best-student.pt")
    state = ckpt["models"]["student"]
    state["fc.weight"], state["fc.bias"] = state["fc.weight"] * c, state["fc.bias"] * c
    save({k: v for k, v in ckpt.items() if k not in ("format", "version")}, hot / "checkpoints" / "best-student.pt")
    code, out, err = run_cli(["calibrate", str(hot), "--device", "cpu"], capsys)
    assert code == 0, err
    assert "student" in out
    assert "->" in out
    result = json.loads((hot / "calibration.json").read_text())["models"]["student"]
    assert result["temperature"] > 1  # over-confident: softened
    assert result["temperature"] == pytest.approx(c * plain["temperature"], rel=1e-4)
    val = result["val"]
    assert val["after"]["nll"] < val["before"]["nll"]
    assert val["after"]["nll"] == pytest.approx(plain["val"]["after"]["nll"], rel=1e-5)
    assert result["test"]["after"]["top1"] == result["test"]["before"]["top1"]  # the argmax never moves
    # after scaling, the hot run is the plain run after scaling: the same test scores
    for key in ("nll", "brier"):  # (ECE is a step function of the confidences)
        assert result["test"]["after"][key] == pytest.approx(plain["test"]["after"][key], rel=1e-4, abs=1e-6)


# --- a temperature-scaled teacher ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_teacher_calibration_fits_the_teachers_temperature_on_val(kd_run: Path, tmp_path: Path,
                                                                   cache: Path) -> None:
    raw_teacher = calibrate_run(kd_run, "cpu")["models"]["teacher"]  # T of the raw teacher, fitted on val
    out = tmp_path / "calibrated"
    before = {p.name for p in (cache / "teacher-store").iterdir()}
    summary = train(tiny(out, algo="kd", teacher="cnn", teacher_weights="random", cache_dir=str(cache),
                         teacher_calibration="temperature")).summary
    teacher = summary["models"]["teacher"]
    assert teacher["calibration"] == "temperature"
    assert teacher["calibration_temperature"] == pytest.approx(raw_teacher["temperature"], rel=1e-6)
    # the teaching signal (and so the teacher's evaluation) is t / T_cal
    assert teacher["test"]["nll"] == pytest.approx(raw_teacher["test"]["after"]["nll"], rel=1e-5)
    assert teacher["test"]["top1"] == raw_teacher["test"]["before"]["top1"]
    # the calibrated logits live in a store entry of their own
    assert len({p.name for p in (cache / "teacher-store").iterdir()} - before) == 1


@pytest.mark.e2e
def test_several_teachers_each_get_their_own_temperature(tmp_path: Path, cache: Path) -> None:
    summary = train(tiny(tmp_path / "two", algo="kd", teacher="cnn,cnn", teacher_weights="random",
                         cache_dir=str(cache), teacher_calibration="temperature")).summary
    fitted = [summary["models"][name]["calibration_temperature"] for name in ("teacher0", "teacher1")]
    assert all(t > 0 for t in fitted)
    assert fitted[0] != fitted[1]  # two random teachers (seeds teacher_seed + k): two temperatures
    assert "teacher_agreement" not in summary["models"]["student"]["test"]  # no single teacher to agree with


def test_teacher_calibration_without_a_teacher_is_refused() -> None:
    with pytest.raises(UserError, match="teacher_calibration"):
        setup.resolve(tiny(teacher_calibration="temperature"))


# --- Tf-KD's p from a baseline ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_virtual_p_from_takes_the_baselines_best_val_top1(baseline_run: Path, tmp_path: Path, cache: Path) -> None:
    top1 = _summary(baseline_run)["models"]["student"]["val_best"]["top1"]
    result = train(tiny(tmp_path / "tfkd", algo="tfkd", virtual_p_from=str(baseline_run)))
    assert result.config.virtual_p == top1
    assert f"v(p={top1:g})" in result.summary["objective"]
    assert f"virtual_p: {top1}" in (tmp_path / "tfkd" / "config.yaml").read_text()
    # the virtual teacher puts p on the label, always its argmax: one bin, ECE = MCE = 1 - p
    rows = [json.loads(line) for line in (tmp_path / "tfkd" / "metrics.jsonl").read_text().splitlines()]
    train_row = next(r for r in rows if r["split"] == "train")
    assert train_row["tfkd_target_ece"] == pytest.approx(1 - top1, abs=1e-6)
    assert train_row["tfkd_target_mce"] == pytest.approx(1 - top1, abs=1e-6)
    # auto: the student's own baseline, trained once into the cache as a teacher is
    auto = train(tiny(tmp_path / "auto", algo="tfkd", virtual_p_from="auto", cache_dir=str(cache)))
    cached = next((cache / "teachers").glob("cnn-*/summary.json"))
    assert auto.config.virtual_p == json.loads(cached.read_text())["models"]["student"]["val_best"]["top1"]
    with pytest.raises(UserError, match="virtual_p_from"):
        setup.resolve(tiny(virtual_p_from=str(baseline_run)))  # a tfkd parameter only
    with pytest.raises(UserError, match="not a finished run"):
        train(tiny(tmp_path / "bad", algo="tfkd", virtual_p_from=str(tmp_path)))


# --- fp64 ----------------------------------------------------------------------------------------------------


def _trajectory(algo: str, steps: int = 5) -> list[torch.Tensor]:
    cfg = setup.resolve(tiny(algo=algo, precision="fp64", device="cpu", students=3, teacher_store="off"))
    rt = resolve_runtime(cfg)
    task, _ = build_task(cfg, rt)
    assert all(p.dtype == torch.float64 for s in task.students for p in s.raw.parameters())
    meters, out = TrainMeters(task), []
    for i, batch in enumerate(task.loaders["train"].epoch(0)):
        if i == steps:
            break
        train_step(task, batch, i / 100, meters)
        out.append(torch.cat([p.detach().flatten() for s in task.students for p in s.raw.parameters()]).clone())
    return out


@pytest.mark.e2e
def test_fp64_dml_and_dml_e_trajectories_agree_to_1e_9() -> None:
    """DML's gradient mean_j (softmax(z_i/T) - p_j)/T equals DML_e's (softmax(z_i/T) - mean_j p_j)/T exactly; in
    float64 the two trajectories differ only by rounding (float32: ~1e-7 after one step)."""
    dml, dml_e = _trajectory("dml"), _trajectory("dml_e")
    assert len(dml) == len(dml_e) == 5
    for a, b in zip(dml, dml_e, strict=True):
        assert a.dtype == torch.float64
        assert float((a - b).abs().max()) < 1e-9


def test_fp64_is_refused_off_the_cpu() -> None:
    cfg = tiny(precision="fp64")
    for device in ("cuda", "mps"):
        with pytest.raises(ConfigError, match="CPU only"):
            _precision(cfg, torch.device(device))
    assert _precision(cfg, torch.device("cpu")) == "fp64"


# --- two processes -------------------------------------------------------------------------------------------


CALIBRATION_JOB = job(
    "kd-teacher-calibration",
    "test_calibration_tools.py::test_torchrun_gathers_every_sample_for_ace_and_fits_one_temperature_on_all_of_val",
    "train", "--algo", "kd", "--teacher", "cnn", "--teacher-epochs", "1", "--allow-weak-teacher",
    "--teacher-calibration", "temperature", "--dataset", "synthetic", "--synthetic-samples", "300", "--model", "mlp",
    "--epochs", "1", "--batch-size", "32", "--out", f"{FOLDER}/run", "--no-progress", "--no-tensorboard")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_torchrun_gathers_every_sample_for_ace_and_fits_one_temperature_on_all_of_val(
        request: pytest.FixtureRequest) -> None:
    """Under torchrun the ACE of the summary is the definition's on the whole test split (gathered, not one
    shard's), and T_cal is the optimum over the whole val split: refitting on the calibrated teacher gives 1.
    The run shares one torchrun launch with the other tests' runs (:mod:`_torchrun`)."""
    got = outcome(request, CALIBRATION_JOB.name)
    assert got.codes == {0: 0, 1: 0}, got.tail()
    out = got.folder / "run"
    task = _load(out, "cpu")
    assert task.teacher is not None
    logits, labels = collect_logits(task, [*task.students, task.teacher], "test")
    got = _summary(out)["models"]["student"]["test"]
    assert got["n"] == len(labels)
    want = reference(logits["student"].numpy(), labels.numpy(), logits["teacher"].numpy())
    for key in ("ace", "mce", "classwise_ece", "teacher_agreement"):
        assert got[key] == pytest.approx(want[key], abs=1e-5), key
    # the run read its teacher's logits from its float16 store, this process computes them: close, not equal
    assert got["teacher_kl"] == pytest.approx(want["teacher_kl"], rel=5e-2)
    refit = calibrate_run(out, "cpu")["models"]["teacher"]["temperature"]
    assert refit == pytest.approx(1.0, abs=1e-2)
