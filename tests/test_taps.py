"""Forward-hook taps: exact agreement with torchvision's feature extractor, wrappers, and the stage maps."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from distillistic.errors import UserError
from distillistic.models.builders import build_model
from distillistic.models.taps import Taps, torchvision_stages

RESNET_LAYERS = {"layer1": "layer1", "layer2": "layer2", "layer3": "layer3", "layer4": "layer4"}


def resnet18() -> tvm.ResNet:
    torch.manual_seed(0)
    return tvm.resnet18(weights=None, num_classes=10).eval()


def image(size: int = 64, channels: int = 3, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


def test_resnet18_taps_equal_torchvision_feature_extractor_exactly() -> None:
    model, x = resnet18(), image()
    reference = create_feature_extractor(model, {**RESNET_LAYERS, "flatten": "flat"})
    with torch.no_grad():
        expected = reference(x)
        taps = Taps(model, RESNET_LAYERS, embedding="fc")
        logits = model(x)
    got = taps.pop()
    assert list(got) == [*RESNET_LAYERS, "embedding"]
    for name in RESNET_LAYERS:
        assert torch.equal(got[name], expected[name]), name
    assert torch.equal(got["embedding"], expected["flat"])  # fc's input: the pooled, flattened layer4
    assert torch.equal(model.fc(got["embedding"]), logits)


def test_pop_clears_a_second_capture_without_pop_raises_and_remove_stops_capturing() -> None:
    model, x = resnet18(), image(32)
    taps = Taps(model, {"l1": "layer1"})
    with torch.no_grad():
        model(x)
        assert set(taps.pop()) == {"l1"}
        assert taps.pop() == {}
        model(x)
        with pytest.raises(RuntimeError, match="fired twice"):
            model(x)
        taps.remove()
        taps.pop()
        model(x)
    assert taps.pop() == {}


def test_student_taps_keep_the_graph_teacher_taps_under_no_grad_do_not() -> None:
    model, x = resnet18(), image(32)
    taps = Taps(model, {"l2": "layer2"}, embedding="fc")
    model(x)
    got = taps.pop()
    got["l2"].pow(2).mean().backward()
    assert model.layer1[0].conv1.weight.grad is not None
    assert model.layer3[0].conv1.weight.grad is None  # after the tap: not on its path
    with torch.no_grad():
        model(x)
    assert all(t.grad_fn is None and not t.requires_grad for t in taps.pop().values())


def test_embedding_name_is_reserved() -> None:
    with pytest.raises(ValueError, match="reserved"):
        Taps(resnet18(), {"embedding": "layer1"}, embedding="fc")


@pytest.mark.e2e
def test_taps_fire_through_torch_compile_of_the_wrapper() -> None:
    model, x = resnet18(), image(32)
    taps = Taps(model, RESNET_LAYERS, embedding="fc")
    model(x)
    eager = {k: v.detach() for k, v in taps.pop().items()}
    compiled = torch.compile(model, backend="eager")
    try:
        for _ in range(2):  # the second call runs the cached graph: the hooks must still fire
            compiled(x)
            got = taps.pop()
            assert list(got) == list(eager)
            for name, value in eager.items():
                torch.testing.assert_close(got[name], value, rtol=0, atol=0)
            model.zero_grad()
            got["layer2"].sum().backward()  # a student's tap keeps its graph through the compiled call
            grad = model.layer1[0].conv1.weight.grad
            assert grad is not None
            assert grad.abs().sum() > 0
    finally:
        torch._dynamo.reset()


def test_taps_fire_through_distributed_data_parallel(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed is unavailable or already initialised")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model, x = resnet18().train(), image(32)
        taps = Taps(model, {"l3": "layer3"}, embedding="fc")
        wrapped = DistributedDataParallel(model)
        wrapped(x).sum().backward()
        got = taps.pop()
        assert got["l3"].shape == (2, 256, 2, 2)
        assert got["l3"].grad_fn is not None
        assert got["embedding"].shape == (2, 512)
    finally:
        dist.destroy_process_group()


@pytest.mark.e2e
@pytest.mark.parametrize(("arch", "stages", "head"), [
    ("resnet18", {"stride4": "layer1", "stride8": "layer2", "stride16": "layer3", "stride32": "layer4"}, "fc"),
    ("mobilenet_v2", {"stride2": "features.1", "stride4": "features.3", "stride8": "features.6",
                      "stride16": "features.13", "stride32": "features.18"}, "classifier"),
    ("mobilenet_v3_small", {"stride2": "features.0", "stride4": "features.1", "stride8": "features.3",
                            "stride16": "features.8", "stride32": "features.12"}, "classifier"),
    ("efficientnet_b0", {"stride2": "features.1", "stride4": "features.2", "stride8": "features.3",
                         "stride16": "features.5", "stride32": "features.8"}, "classifier"),
    ("convnext_tiny", {"stride4": "features.1", "stride8": "features.3", "stride16": "features.5",
                       "stride32": "features.7"}, "classifier.2"),
])
def test_torchvision_stage_maps(arch: str, stages: dict[str, str], head: str) -> None:
    """Expected indices from torchvision's architecture tables (the blocks just before each stride-2 block)."""
    torch.manual_seed(0)
    model = tvm.get_model(arch, weights=None, num_classes=10)
    model.train()
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert torchvision_stages(arch, model) == (stages, head)
    assert model.training
    assert all(m.training for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in bn_before.items())  # probe ran in eval mode


def test_cifar_resnet_stem_changes_the_strides() -> None:
    torch.manual_seed(0)
    model = build_model("cifar_resnet18", 10, 3, 32)
    stages, head = torchvision_stages("cifar_resnet18", model)
    assert stages == {"stride1": "layer1", "stride2": "layer2", "stride4": "layer3", "stride8": "layer4"}
    assert head == "fc"


def test_small_cnn_stages_are_the_blocks_before_each_pool_and_the_last() -> None:
    torch.manual_seed(0)
    model = build_model("cnn_wide", 10, 1, 28).eval()
    stages, head = torchvision_stages("cnn_wide", model)
    feats = typing.cast(nn.Sequential, model.get_submodule("features"))  # block, pool, block, block, pool, block, block
    assert [type(feats[int(n.split(".")[1]) + 1]).__name__ for n in list(stages.values())[:-1]] == ["MaxPool2d"] * 2
    assert list(stages.values())[-1] == f"features.{len(feats) - 1}"
    assert list(stages) == ["stride1", "stride2", "stride4"]
    assert head == "fc"
    x = image(28, channels=1)
    with torch.no_grad(), Taps(model, stages, embedding=head) as taps:
        model(x)
        got = taps.pop()
    assert [tuple(got[k].shape) for k in stages] == [(2, 64, 28, 28), (2, 128, 14, 14), (2, 256, 7, 7)]
    assert torch.equal(got["embedding"], got["stride4"].mean(dim=(2, 3)))


def test_mlp_has_only_an_embedding() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", 10, 1, 8).eval()
    stages, head = torchvision_stages("mlp", model)
    assert stages == {}
    assert head == "fc"
    x = image(8, channels=1)
    with torch.no_grad(), Taps(model, stages, embedding=head) as taps:
        model(x)
        assert torch.equal(taps.pop()["embedding"], model.get_submodule("net")(x))


def test_unknown_architecture_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no feature stages"):
        torchvision_stages("vgg11_bn", nn.Linear(2, 2))
