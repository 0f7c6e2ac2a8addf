"""The model registry: every model builds for K classes, frozen backbones, ImageNet weights from the local cache."""

from __future__ import annotations

import urllib.error
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from distillistic.errors import CheckpointError, UserError
from distillistic.models.builders import MODELS, build_model, head_name


@pytest.mark.e2e
@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_builds_for_k_classes(name: str) -> None:
    spec = MODELS.get(name)
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, data_channels=1, image_size=32)
    channels = spec.channels(1)
    assert channels == (3 if spec.fixed_channels else 1)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(3, channels, 32, 32))
    assert out.shape == (3, 7)
    head = model.get_submodule(head_name(model))
    assert isinstance(head, nn.Linear)
    assert head.out_features == 7


@pytest.mark.parametrize(("name", "size"), [("cnn", 8), ("cnn", 28), ("mlp", 8), ("cnn_wide", 28), ("cnn", 3)])
def test_small_models_take_the_datasets_channels_and_size(name: str, size: int) -> None:
    for channels in (1, 3):
        model = build_model(name, 10, channels, size)
        assert model(torch.randn(2, channels, size, size)).shape == (2, 10)


def test_cifar_stem_keeps_the_resolution() -> None:
    model = build_model("cifar_resnet18", 10, 1, 28)
    conv = model.get_submodule("conv1")
    assert isinstance(conv, nn.Conv2d)
    assert conv.kernel_size == (3, 3)
    assert conv.stride == (1, 1)
    assert isinstance(model.get_submodule("maxpool"), nn.Identity)


@pytest.mark.parametrize("name", ["cnn", "mlp", "resnet18", "mobilenet_v3_small"])
def test_freeze_backbone_leaves_only_the_head_trainable(name: str) -> None:
    model = build_model(name, 5, 1, 32, freeze_backbone=True)
    head = head_name(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{head}.weight", f"{head}.bias"}
    # and a step changes the head only
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    nn.functional.cross_entropy(model(torch.randn(4, MODELS.get(name).channels(1), 32, 32)),
                                torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def _cache_file(torch_home: Path, name: str) -> Path:
    url = tvm.get_model_weights(name).DEFAULT.url
    return torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TORCH_HOME, and no network: torchvision's download fails at once."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch"


def test_imagenet_weights_are_loaded_from_torchvisions_cache(torch_home: Path) -> None:
    torch.manual_seed(123)
    reference = tvm.mobilenet_v3_small(weights=None)  # stands in for the published ImageNet weights
    path = _cache_file(torch_home, "mobilenet_v3_small")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 7, 1, 64, imagenet=True)
    state, ref = model.state_dict(), reference.state_dict()
    head = head_name(model)
    for key, value in ref.items():
        if key.startswith(head):
            continue
        assert torch.equal(state[key], value), key
    assert state[f"{head}.weight"].shape == (7, ref[f"{head}.weight"].shape[1])  # a new 7-class head
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_missing_imagenet_weights_give_a_clear_error(torch_home: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError) as info:
        build_model("mobilenet_v3_small", 7, 1, 64, imagenet=True)
    message = str(info.value)
    assert f"'{torch_home / 'hub' / 'checkpoints'}'" in message
    assert _cache_file(torch_home, "mobilenet_v3_small").name in message
    assert "\n" not in message
    out, err = capfd.readouterr()
    assert "Downloading" not in out + err  # torch.hub's line is held back: the error is all the user reads


def test_a_download_is_told_after_it_succeeded(torch_home: Path, monkeypatch: pytest.MonkeyPatch,
                                               capfd: pytest.CaptureFixture[str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(123)
    reference = tvm.mobilenet_v3_small(weights=None)

    def download(url: str, dst: str, *args: Any, **kwargs: Any) -> None:
        torch.save(reference.state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    with caplog.at_level("INFO", logger="distillistic"):
        build_model("mobilenet_v3_small", 7, 1, 64, imagenet=True)
    path = _cache_file(torch_home, "mobilenet_v3_small")
    assert path.is_file()
    assert "Downloading" not in capfd.readouterr().out
    assert f"downloaded the ImageNet weights of mobilenet_v3_small to {path}" in caplog.text


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_cached_file_holding_code_is_refused_without_running_it(torch_home: Path, tmp_path: Path) -> None:
    path = _cache_file(torch_home, "mobilenet_v3_small")
    path.parent.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    torch.save({"features.0.0.weight": torch.zeros(1), "evil": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refused.*weights cache: delete it"):
        build_model("mobilenet_v3_small", 7, 1, 64, imagenet=True)
    assert not marker.exists()


def test_models_without_imagenet_weights_refuse_them() -> None:
    with pytest.raises(UserError, match="model 'cnn' has no ImageNet weights"):
        build_model("cnn", 10, 1, 8, imagenet=True)
