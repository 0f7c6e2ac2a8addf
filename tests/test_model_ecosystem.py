"""The CIFAR KD zoo and timm models in the model registry: listing with parameter counts, each model's own
input normalisation, timm students and teachers trained from the CLI (skipped without timm)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from _util import run_cli
from distillistic.core.signals import StepInputs, Teacher
from distillistic.data.loader import DataInfo
from distillistic.data.views import ViewMaker
from distillistic.errors import UserError
from distillistic.models import timm_models
from distillistic.models.builders import MODELS, build_model, parameter_count
from distillistic.models.cifar import CIFAR_MODELS
from test_cifar_zoo import PINNED

needs_timm = pytest.mark.skipif(not timm_models.available(), reason="timm is not installed (pip install '.[timm]')")
SYNTH = ["--dataset", "synthetic", "--synthetic-channels", "3", "--image-size", "32", "--synthetic-samples", "160",
         "--epochs", "1", "--batch-size", "32", "--no-progress", "--no-tensorboard", "--num-workers", "0"]


@pytest.mark.e2e
def test_every_zoo_model_is_registered_with_its_pinned_count() -> None:
    for name in CIFAR_MODELS:
        spec = MODELS.get(name)
        assert spec.family == "cifar"
        assert parameter_count(name, 100) == PINNED[name][0], name
        assert parameter_count(name, 10) == PINNED[name][1], name
    model = build_model("resnet8x4", 100, 3, 32)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_list_models_prints_counts_by_family(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli(["list", "models", "--num-classes", "100", "--family", "cifar"], capsys)
    assert rc == 0, err
    counts = {m.group(1): int(m.group(2).replace(",", ""))
              for m in re.finditer(r"^\s+(\S+)\s+([\d,]+)\s+(?:[\d,]+|–)$", out, re.MULTILINE)}
    assert counts == {name: PINNED[name][0] for name in CIFAR_MODELS}
    assert out.splitlines()[0].startswith("cifar (21 models")
    rc, out, _ = run_cli(["list", "models", "--num-classes", "10", "--family", "small"], capsys)
    assert rc == 0
    # cnn by hand: conv 3->32 + BN, conv 32->64 + BN, conv 64->64 + BN, linear 64->10
    cnn = (3 * 32 * 9 + 2 * 32) + (32 * 64 * 9 + 2 * 64) + (64 * 64 * 9 + 2 * 64) + (64 * 10 + 10)
    # its MACs at 3 x 32 x 32: conv 3->32 at 32 px, max-pool, conv 32->64 and 64->64 at 16 px, linear 64->10
    macs = 32 * 32 * 32 * 3 * 9 + 16 * 16 * 64 * 32 * 9 + 16 * 16 * 64 * 64 * 9 + 64 * 10
    assert re.search(rf"^\s+cnn\s+{cnn:,d}\s+{macs:,d}$", out, re.MULTILINE), out
    rc, _, err = run_cli(["list", "models", "--num-classes", "10", "--family", "keras"], capsys)
    assert rc == 2
    assert "unknown model family 'keras'" in err[-1]


def _info(mean: tuple[float, ...], std: tuple[float, ...]) -> DataInfo:
    return DataInfo("synthetic", 4, 3, 8, mean, std, ("a", "b", "c", "d"), {}, "", None)


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return x.mean((2, 3))[:, :1].expand(-1, 4)


def test_each_model_reads_the_same_crop_normalised_its_own_way() -> None:
    """Dataset statistics for one model, a timm-style (0.5, 0.5) for the other: both from the same uint8 pixels."""
    from distillistic.data.loader import Batch

    data_mean, data_std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    own = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    maker = ViewMaker(_info(data_mean, data_std), "none", 0, torch.device("cpu"))
    views = maker(Batch(images, torch.zeros(5, dtype=torch.int64), torch.arange(5), 0), train=False)
    x = images.double() / 255
    expect_data = (x - torch.tensor(data_mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        data_std, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(views.get(None, 3).double(), expect_data, atol=1e-5, rtol=0)
    torch.testing.assert_close(views.get(None, 3, own).double(), (x - 0.5) / 0.5, atol=1e-5, rtol=0)
    recorder = _Recorder()
    teacher = Teacher(recorder, None, 3, norm=own)
    teacher.eval_logits(StepInputs(views, torch.zeros(5, dtype=torch.int64), [torch.zeros(5, 4)], 4))
    torch.testing.assert_close(recorder.seen[0].double(), (x - 0.5) / 0.5, atol=1e-5, rtol=0)


def test_without_timm_a_timm_model_is_one_clear_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timm_models, "available", lambda: False)
    rc, _, err = run_cli(["train", *SYNTH, "--model", "timm/resnet10t", "--out", str(tmp_path / "r")], capsys)
    assert rc == 2
    assert err == ["distillistic: error: config key 'model': model 'timm/resnet10t' needs the optional package "
                   "timm, which is not installed: pip install 'distillistic[timm]'"]
    assert not (tmp_path / "r").exists()


@needs_timm
def test_timm_names_are_checked(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = run_cli(["train", *SYNTH, "--model", "timm/resnet10", "--out", str(tmp_path / "r")], capsys)
    assert rc == 2
    assert "timm has no model 'resnet10'" in err[-1]
    assert "timm/resnet10" not in MODELS.names()
    spec = MODELS.get("timm/vit_tiny_patch16_224")
    assert (spec.family, spec.norm) == ("timm", ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    assert MODELS.get("timm/resnet10t").norm == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert MODELS.get("resnet18").norm is None


@needs_timm
def test_pretrained_timm_weights_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match="pretrained weights of timm model 'resnet10t' are not in the Hugging Face "
                                        "cache and could not be downloaded"):
        build_model("timm/resnet10t", 10, 3, 32, imagenet=True)


@pytest.mark.e2e
@needs_timm
@pytest.mark.parametrize("argv", [
    ["--model", "timm/resnet10t"],  # a timm student alone
    ["--algo", "kd", "--model", "mobilenet_v3_small", "--teacher", "timm/resnet10t",
     "--teacher-weights", "random"],  # a timm teacher, a torchvision student
    ["--algo", "kd", "--model", "timm/vit_tiny_patch16_224", "--teacher", "resnet18", "--teacher-weights", "random"],
    ["--algo", "dml", "--model", "timm/resnet10t", "--students", "2"],  # a cohort of timm students
    ["--algo", "dml", "--students", "timm/resnet10t,mobilenet_v3_small"],  # a mixed cohort: timm + torchvision
], ids=["timm-student", "timm-teacher", "timm-vit-student-torchvision-teacher", "timm-dml-cohort",
        "timm-torchvision-mixed-cohort"])
def test_timm_models_train_from_the_cli(argv: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, out, err = run_cli(["train", *SYNTH, *argv, "--out", str(tmp_path / "run")], capsys)
    assert rc == 0, err
    assert re.search(r"student\d? top1", out), out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    if "," in argv[-1]:  # each member of a mixed cohort is recorded with its own architecture
        assert [summary["models"][f"student{i}"]["arch"] for i in range(2)] == argv[-1].split(",")
