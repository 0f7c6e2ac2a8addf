"""Feature distillation end to end: fitnet, at, sp, rkd, crd, reviewkd, catkd on digits, alone, with KD and
cross-quality.

The taps themselves are checked against torchvision's ``create_feature_extractor`` in ``test_taps.py``; here
the terms get the student's maps with gradient and the teacher's without (values recomputed independently in
float64 from ``create_feature_extractor`` outputs), the loop trains them, a run resumes exactly after SIGKILL
with the adapters, memory bank and generator, and ``export`` writes the students' own weights only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.feature_extraction import create_feature_extractor

from _torchrun import FOLDER, job, outcome
from _util import tiny
from distillistic import train
from distillistic.core.features import match_grid
from distillistic.core.signals import StepInputs, Teacher, Teaching
from distillistic.data.views import Views
from distillistic.methods.fitnet import FitNet
from distillistic.models.builders import build_model
from distillistic.models.stages import attach_taps, feature_shapes
from distillistic.runs.export import export_run
from distillistic.training.checkpoint import load

STUDENT = {"fitnet": "cnn", "at": "cnn", "sp": "cnn", "rkd": "mlp", "crd": "mlp", "reviewkd": "cnn", "catkd": "cnn"}
NAME = {algo: algo for algo in STUDENT}
WEIGHT = {"fitnet": 100.0, "at": 1000.0, "sp": 3000.0, "rkd": 1.0, "crd": 0.8, "reviewkd": 5.0, "catkd": 15.0}
VARIANTS: dict[str, dict[str, Any]] = {
    "alone": {},
    "kd": {"feature_kd": 0.9},
    # the student reads 4 px views: one resolution only (stage1); the teacher's 8 px maps are pooled to 4 px
    "res4": {"student_resolution": 4},
}


def _train_row(out: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["split"] == "train" and r["model"] == "student")


@pytest.mark.e2e
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("algo", list(STUDENT))
def test_method_trains_on_digits(algo: str, variant: str, tmp_path: Path) -> None:
    extra = dict(VARIANTS[variant])
    if variant == "res4" and algo == "fitnet":
        extra["hint_stage"] = "stage1"  # a 4 px cnn has a single resolution
    if algo == "reviewkd":
        extra["reviewkd_warmup"] = 0.0  # a constant weight, so that the identity below holds for epoch means
    cfg = tiny(tmp_path / "run", algo=algo, model=STUDENT[algo], teacher="cnn", teacher_weights="random",
               max_train_samples=128, batch_size=32, **extra)
    result = train(cfg)
    assert result.summary["status"] == "completed"
    row = _train_row(result.out)
    term = row[NAME[algo]]
    assert term == term
    assert term > 0
    kd = 0.9 * row["kd"] if variant == "kd" else 0.0
    # the sum composition: epoch means are linear, so the identity holds for them too
    assert row["loss"] == pytest.approx(row["ce"] + WEIGHT[algo] * term + kd, rel=1e-5)
    manifest = json.loads((result.out / "manifest.json").read_text())
    assert manifest["teacher_outputs"].startswith("live")
    assert f"{WEIGHT[algo]:g}·" in manifest["objective"] or algo == "rkd"
    if algo == "crd":  # 128 training samples: 127 negatives, not 16384
        assert "K=127" in manifest["objective"]


def test_terms_get_student_maps_with_gradient_and_teacher_maps_without() -> None:
    torch.manual_seed(0)
    student, teacher = build_model("cnn", 10, 1, 8), build_model("cnn", 10, 1, 4).eval()
    signal = Teacher(teacher, 4, 1)  # cross-quality the other way round: the teacher reads 4 px
    x = torch.randn(6, 1, 8, 8)
    s_shape = feature_shapes("cnn", student, ["stage2"], 1, 8)["stage2"]  # [2, 64, 4, 4]
    t_shape = feature_shapes("cnn", teacher, ["stage1"], 1, 4)["stage1"]  # [2, 64, 4, 4], a 4 px cnn: one stage
    term = FitNet(signal, "stage2", "stage1", 100.0, [s_shape], t_shape).double()
    student.double(), teacher.double()
    views = Views(x.double(), False)
    # independently, before any hook: the same maps from torchvision's feature extractor
    fs = create_feature_extractor(student, {"features.3": "f"})(x.double())["f"]
    ft = create_feature_extractor(teacher, {"features.2": "f"})(views.get(4, 1))["f"]
    taps = attach_taps("cnn", student, ["stage2"], "student")
    signal.taps = attach_taps("cnn", teacher, ["stage1"], "teacher")
    z = student(views.get(None, 1))
    inp = StepInputs(views, torch.zeros(6, dtype=torch.long), [z.detach()], 10, features=[taps.pop()])
    Teaching.of(signal)(inp)  # the step's teaching stage: the teacher's forward and its tapped maps
    value = term.loss(0, z, inp, None)
    value.backward()
    assert not inp.teachers["teacher"].features["stage1"].requires_grad
    expected = ((term.regressors[0](fs) - ft.detach()) ** 2).mean()
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    assert student.features[0][0].weight.grad is not None
    assert student.features[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in term.student_parameters(0))
    assert all(p.grad is None for p in teacher.parameters())


def test_match_grid_pools_the_teacher_to_the_student_grid() -> None:
    ft = torch.randn(2, 3, 8, 6, dtype=torch.float64)
    torch.testing.assert_close(match_grid(ft, (2, 5, 4, 4)), F.adaptive_avg_pool2d(ft, (4, 4)))
    assert match_grid(ft, (2, 5, 16, 16)) is ft  # never enlarged
    v = torch.randn(2, 7)
    assert match_grid(v, (2, 3)) is v


# --- resume after SIGKILL, export ------------------------------------------------------------------------

RESUME_ARGS = ["train", "--dataset", "synthetic", "--synthetic-samples", "160", "--image-size", "8", "--model", "cnn",
               "--teacher", "cnn", "--teacher-weights", "random", "--epochs", "2", "--batch-size", "16",
               "--checkpoint-every", "3", "--device", "cpu", "--threads", "1", "--no-tensorboard", "--no-progress"]


@pytest.mark.multiprocess
@pytest.mark.parametrize(("algo", "args"), [("crd", ["--crd-negatives", "40", "--feature-kd", "0.5"]),
                                            ("fitnet", [])])
def test_a_feature_method_resumes_exactly_after_sigkill(algo: str, args: list[str], tmp_path: Path) -> None:
    from test_resume import _assert_same_tensors, assert_identical_runs, killed_then_resumed, run_cli

    own = [*RESUME_ARGS, "--algo", algo, *args]
    ref, out = tmp_path / "ref", tmp_path / "run"
    done = run_cli([*own, "--out", str(ref)])
    assert done.returncode == 0, done.stderr[-2000:]
    killed_then_resumed(own, out)
    assert_identical_runs(ref, out)
    a, b = load(ref / "checkpoints" / "last.pt"), load(out / "checkpoints" / "last.pt")
    _assert_same_tensors(a["terms"], b["terms"], "terms")  # adapters, memory bank, Z, the generator's state
    keys = set(a["terms"])
    if algo == "crd":
        assert {"terms.0.heads.0.memory.memory_s", "terms.0.heads.0.embed_s.linear.weight",
                "terms.0._extra_state"} <= keys
    else:
        assert "terms.0.regressors.0.conv.weight" in keys
    # export writes the student's own weights, never an adapter
    for path in export_run(out, tmp_path / "export"):
        from safetensors.torch import load_file

        assert set(load_file(str(path))) == set(a["models"]["student"])


CRD_JOB = job("crd-banks",
              "test_feature_methods.py::test_crd_under_torchrun_updates_the_banks_with_every_ranks_samples",
              "train", "--algo", "crd", "--teacher", "cnn", "--teacher-weights", "random", "--crd-negatives", "64",
              "--feature-kd", "0.5", "--dataset", "synthetic", "--synthetic-samples", "300", "--image-size", "8",
              "--model", "cnn", "--epochs", "1", "--batch-size", "32", "--out", f"{FOLDER}/run", "--no-progress",
              "--no-tensorboard")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_crd_under_torchrun_updates_the_banks_with_every_ranks_samples(request: pytest.FixtureRequest) -> None:
    got = outcome(request, CRD_JOB.name)  # in one torchrun launch with the other tests' runs (_torchrun.py)
    assert got.codes == {0: 0, 1: 0}, got.tail()
    out = got.folder / "run"
    ckpt = load(out / "checkpoints" / "last.pt")
    assert json.loads((out / "manifest.json").read_text())["world_size"] == 2
    trained = ckpt["progress"]["epoch_images"] or ckpt["progress"]["train_images"]
    # every sample both ranks trained on was written to rank 0's banks: those rows (and only those) are unit norm
    norms = ckpt["terms"]["terms.0.heads.0.memory.memory_s"].norm(dim=1)
    assert int(((norms - 1).abs() < 1e-5).sum()) == trained


@pytest.mark.e2e
def test_from_the_cli_with_a_teacher_trained_first_and_explicit_stages(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The teacher is trained as a baseline (the method's parameters are not its own) and the flags parse."""
    from distillistic.cli import main

    monkeypatch.setenv("DISTILLISTIC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    rc = main(["train", "--algo", "at", "--at-stages", "stage2", "--feature-weight", "10", "--teacher", "cnn",
               "--teacher-epochs", "1", "--dataset", "digits", "--model", "cnn", "--epochs", "1",
               "--max-train-samples", "128", "--batch-size", "32", "--out", str(out), "--no-progress",
               "--no-tensorboard", "--num-workers", "0", "--allow-weak-teacher"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == "L = CE(z, y) + 10·AT(F_s, F_t)[stage2]"
    assert summary["models"]["teacher"]["source"].startswith(str(tmp_path / "cache"))


@pytest.mark.e2e
@pytest.mark.parametrize("algo", ["fitnet", "crd"])
def test_a_cohort_gets_one_adapter_per_student_in_its_own_optimizer(algo: str, tmp_path: Path) -> None:
    cfg = tiny(tmp_path / "run", algo=algo, students=2, teacher="cnn", teacher_weights="random",
               max_train_samples=64, batch_size=32, checkpoint_every=1)
    result = train(cfg)
    ckpt = load(result.out / "checkpoints" / "last.pt")
    adapters = {k.split(".")[3] for k in ckpt["terms"] if k.startswith(("terms.0.regressors.", "terms.0.heads."))}
    assert adapters == {"0", "1"}
    student_params = len(ckpt["models"]["student0"]) - sum(k.endswith(("running_mean", "running_var",
                                                                        "num_batches_tracked"))
                                                            for k in ckpt["models"]["student0"])
    term_params = 4 if algo == "crd" else 3  # embed_s, embed_t (weight, bias) / conv, BN weight and bias
    for state in ckpt["optimizers"]:
        assert len(state["param_groups"][0]["params"]) + sum(
            len(g["params"]) for g in state["param_groups"][1:]) == student_params + term_params


@pytest.mark.e2e
@pytest.mark.parametrize("algo", list(STUDENT))
def test_no_host_reads_per_step_and_one_teacher_forward_per_step(tmp_path: Path, algo: str) -> None:
    from distillistic.training import engine
    from test_speed_invariants import _HostReads, _NoHooks, _task

    reads, calls = [], []
    for samples in (120, 360):  # 5 and 15 steps
        task = _task(tmp_path, algo=algo, students=2, synthetic_samples=samples, teacher="cnn",
                     teacher_weights="random")
        assert task.teacher is not None
        steps: list[int] = []
        task.teacher.model.register_forward_hook(lambda m, args, out, steps=steps: steps.append(len(args[0])))
        with _HostReads() as mode:
            engine.train_one_epoch(task, engine.Progress(), _NoHooks())
        reads.append(mode.count)
        calls.append((steps, len(task.loaders["train"])))
    assert reads[0] == reads[1]
    for steps, n in calls:
        assert steps == [16] * n  # one teacher forward per step for the whole cohort, taps included
