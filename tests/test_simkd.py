"""SimKD against a float64 transcription of the authors' code (value, prediction and gradient to 1e-10), and the
exported student: backbone + projector + the teacher's classifier, predicting what that composition predicts.

Reference: DefangChen/SimKD at commit 2b389c31ed7779aea31e7aaf0bb0f2d8b6ac2f01: the ``SimKD`` module of
``models/util.py`` (lines 188-236) and its loss in ``helper/loops.py`` (lines 150-157: ``logit_s = pred_feat_s``,
``loss_kd = MSELoss(trans_feat_s, trans_feat_t)``, ``loss = cls·CE + div·KD + beta·loss_kd`` with the README's
``-c 0 -d 0 -b 1``), transcribed below with only the ``torch`` calls it makes.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _util import tiny
from distillistic import load_student, train
from distillistic.methods.simkd import Reused, projector, simkd_loss
from distillistic.models.builders import build_model
from distillistic.runs.export import export_run
from distillistic.training.checkpoint import load, read_safetensors

# --- the reference, as the authors write it ----------------------------------------------------------------------


class SimKD(nn.Module):
    """CVPR-2022: Knowledge Distillation with the Reused Teacher Classifier"""

    def __init__(self, *, s_n, t_n, factor=2):  # type: ignore[no-untyped-def]
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))

        def conv1x1(in_channels, out_channels, stride=1):  # type: ignore[no-untyped-def]
            return nn.Conv2d(in_channels, out_channels, kernel_size=1, padding=0, stride=stride, bias=False)

        def conv3x3(in_channels, out_channels, stride=1, groups=1):  # type: ignore[no-untyped-def]
            return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, stride=stride, bias=False,
                             groups=groups)

        self.transfer = nn.Sequential(
            conv1x1(s_n, t_n // factor), nn.BatchNorm2d(t_n // factor), nn.ReLU(inplace=True),
            conv3x3(t_n // factor, t_n // factor), nn.BatchNorm2d(t_n // factor), nn.ReLU(inplace=True),
            conv1x1(t_n // factor, t_n), nn.BatchNorm2d(t_n), nn.ReLU(inplace=True))

    def forward(self, feat_s, feat_t, cls_t):  # type: ignore[no-untyped-def]
        s_H, t_H = feat_s.shape[2], feat_t.shape[2]
        if s_H > t_H:
            source = F.adaptive_avg_pool2d(feat_s, (t_H, t_H))
            target = feat_t
        else:
            source = feat_s
            target = F.adaptive_avg_pool2d(feat_t, (s_H, s_H))
        trans_feat_t = target
        trans_feat_s = self.transfer(source)
        temp_feat = self.avg_pool(trans_feat_s)
        temp_feat = temp_feat.view(temp_feat.size(0), -1)
        pred_feat_s = cls_t(temp_feat)
        return trans_feat_s, trans_feat_t, pred_feat_s


# --- the comparison ---------------------------------------------------------------------------------------------


class _Student(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, channels, 3, padding=1), nn.Tanh())
        self.fc = nn.Linear(channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def _rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


@pytest.mark.unit
@pytest.mark.parametrize("scale", [1.0, 1e3])
@pytest.mark.parametrize(("s_grid", "t_grid"), [(8, 4), (4, 8), (6, 6)])
def test_loss_prediction_and_gradients_match_the_authors(s_grid: int, t_grid: int, scale: float) -> None:
    s_n, t_n, k = 6, 8, 5
    torch.manual_seed(0)
    student = _Student(s_n).double()
    proj = projector(s_n, t_n, 2).double()
    with torch.no_grad():  # non-trivial BN affines, so that every parameter matters
        for p in proj.parameters():
            p.add_(_rand(*p.shape, seed=p.numel()) * 0.1)
    classifier = nn.Linear(t_n, k).double()
    x, ft = _rand(3, 2, s_grid, s_grid, seed=1, scale=scale), _rand(3, t_n, t_grid, t_grid, seed=2, scale=scale)
    ref_student = _Student(s_n).double()
    ref_student.load_state_dict(student.state_dict())
    ref = SimKD(s_n=s_n, t_n=t_n, factor=2).double()
    ref.transfer.load_state_dict(proj.state_dict())
    mine = Reused(student, student.features, proj, classifier, (t_grid, t_grid))
    logits = mine(x)
    assert mine.projected is not None
    loss = simkd_loss(mine.projected, ft)
    trans_s, trans_t, pred = ref(ref_student.features(x), ft, classifier)
    ref_loss = 1.0 * nn.MSELoss()(trans_s, trans_t)
    torch.testing.assert_close(logits, pred, rtol=1e-10, atol=1e-12)
    assert loss.dtype == torch.float64
    assert math.isclose(loss.item(), ref_loss.item(), rel_tol=1e-10, abs_tol=1e-12)
    loss.backward()
    ref_loss.backward()
    mine_grads = [p.grad for p in [*student.features.parameters(), *proj.parameters()]]
    ref_grads = [p.grad for p in [*ref_student.features.parameters(), *ref.transfer.parameters()]]
    for a, b in zip(mine_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert classifier.weight.grad is None  # the reused classifier is frozen


@pytest.mark.e2e
def test_the_exported_student_is_backbone_projector_and_the_teachers_classifier(tmp_path: Path) -> None:
    torch.manual_seed(1)
    teacher = build_model("cnn", 10, 1, 8)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    result = train(tiny(tmp_path / "run", algo="simkd", teacher="cnn", teacher_weights=str(tmp_path / "teacher.pt"),
                        max_train_samples=128, batch_size=32, allow_weak_teacher=True))
    assert result.summary["status"] == "completed"
    (path,) = export_run(result.out)
    state, meta = read_safetensors(path)
    assert meta["arch"] == "cnn"
    torch.testing.assert_close(state["classifier.weight"], teacher.fc.weight)  # reused as it is, not trained
    torch.testing.assert_close(state["classifier.bias"], teacher.fc.bias)
    loaded = load_student(path)
    assert isinstance(loaded.model, Reused)
    # the same composition, rebuilt by hand: the plain cnn, the reference's projector, the teacher's fc
    backbone = build_model("cnn", 10, 1, 8)
    backbone.load_state_dict({k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")})
    ref = SimKD(s_n=64, t_n=64, factor=2)
    ref.transfer.load_state_dict({k.removeprefix("projector."): v for k, v in state.items()
                                  if k.startswith("projector.")})
    x = torch.rand(5, 1, 8, 8)
    backbone.eval(), ref.eval()
    with torch.no_grad():
        expected = ref(backbone.features(x), torch.zeros(5, 64, 4, 4), teacher.fc)[2]
        got = loaded.model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, backbone(x), atol=1e-3)  # not the student's own (untrained at c = 0) head


@pytest.mark.multiprocess
def test_a_simkd_run_resumes_exactly_after_sigkill_with_its_projector(tmp_path: Path) -> None:
    from test_feature_methods import RESUME_ARGS
    from test_resume import assert_identical_runs, killed_then_resumed, run_cli

    own = [*RESUME_ARGS, "--algo", "simkd", "--allow-weak-teacher"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    done = run_cli([*own, "--out", str(ref)])
    assert done.returncode == 0, done.stderr[-2000:]
    killed_then_resumed(own, out)
    assert_identical_runs(ref, out)
    state = load(out / "checkpoints" / "last.pt")["models"]["student"]
    assert {"projector.0.weight", "projector.7.running_mean", "classifier.weight", "size"} <= set(state)
