"""CIFAR-100 teachers published by RepDistiller and mdistiller load as ``--teacher-weights FILE``.

Their files (RepDistiller ``scripts/fetch_pretrained_teachers.sh``; mdistiller's release ``cifar_teachers.tar``,
``cifar_teachers/<arch>_vanilla/ckpt_epoch_240.pth``) are ``torch.save({'epoch', 'model': state_dict, 'accuracy',
'optimizer'})`` as written by RepDistiller's ``train_teacher.py`` (lines 150-159). Here the architectures are
transcribed from HobbitLong/RepDistiller at commit b84f547 (``models/resnet.py``, ``models/wrn.py``,
``models/vgg.py``; mdistiller's ``mdistiller/models/cifar`` has the same modules), so the state dict a checkpoint
holds is the one their code names, independently of the zoo under test. The transcription keeps their module
attributes and their forward arithmetic (fixed ``AvgPool2d(8)``, ``view(-1, nChannels)``, VGG's ``F.relu`` after
each block); it drops only the ``is_feat`` outputs. A file written from it loads into the zoo's model of the same
name, and the two give the same float64 logits; through a whole run the loaded teacher's test accuracy is the
reference's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _cifar_files import py2_pickle, trust
from _util import tiny
from distillistic.data.cifar import CIFAR, CIFAR100_MEAN, CIFAR100_STD
from distillistic.models.cifar import CIFAR_MODELS
from distillistic.training.checkpoint import load_model_weights


# ---------------------------------------------------------------- RepDistiller models/resnet.py (BasicBlock)
class RefBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        residual = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + residual)


class RefResNet(nn.Module):
    def __init__(self, depth: int, num_filters: list[int], num_classes: int) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3], num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [RefBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [RefBasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        x = self.avgpool(x)
        return self.fc(x.view(x.size(0), -1))


# ------------------------------------------------------------------------------- RepDistiller models/wrn.py
class RefWideBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = ((not self.equalInOut) and nn.Conv2d(in_planes, out_planes, kernel_size=1,
                                                                stride=stride, padding=0, bias=False)) or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class RefNetworkBlock(nn.Module):
    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[RefWideBlock((i == 0 and in_planes) or out_planes, out_planes,
                                                  (i == 0 and stride) or 1) for i in range(nb_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class RefWideResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, widen_factor: int) -> None:
        super().__init__()
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = RefNetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = RefNetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = RefNetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        self.nChannels = channels[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(self.relu(self.bn1(out)), 8)
        return self.fc(out.view(-1, self.nChannels))


# ------------------------------------------------------------------------------- RepDistiller models/vgg.py
VGG_CFG = {"S": [[64], [128], [256], [512], [512]], "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]}


class RefVGG(nn.Module):
    def __init__(self, cfg: list[list[int]], num_classes: int) -> None:
        super().__init__()
        self.block0 = self._make_layers(cfg[0], 3)
        self.block1 = self._make_layers(cfg[1], cfg[0][-1])
        self.block2 = self._make_layers(cfg[2], cfg[1][-1])
        self.block3 = self._make_layers(cfg[3], cfg[2][-1])
        self.block4 = self._make_layers(cfg[4], cfg[3][-1])
        self.pool0, self.pool1, self.pool2, self.pool3 = (nn.MaxPool2d(kernel_size=2, stride=2) for _ in range(4))
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        if h == 64:
            x = self.pool3(x)
        x = self.pool4(F.relu(self.block4(x)))
        return self.classifier(x.view(x.size(0), -1))

    @staticmethod
    def _make_layers(cfg: list[int], in_channels: int) -> nn.Sequential:  # batch_norm=True (vgg*_bn)
        layers: list[nn.Module] = []
        for v in cfg:
            layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            in_channels = v
        return nn.Sequential(*layers[:-1])


# RepDistiller's model_dict entries (resnet56: depth 56, [16, 16, 32, 64]; resnet32x4: [32, 64, 128, 256]; ...).
REFERENCE = {
    "resnet56": lambda k: RefResNet(56, [16, 16, 32, 64], k),
    "resnet110": lambda k: RefResNet(110, [16, 16, 32, 64], k),
    "resnet32x4": lambda k: RefResNet(32, [32, 64, 128, 256], k),
    "resnet8x4": lambda k: RefResNet(8, [32, 64, 128, 256], k),
    "wrn_40_2": lambda k: RefWideResNet(40, k, 2),
    "wrn_16_2": lambda k: RefWideResNet(16, k, 2),
    "vgg13": lambda k: RefVGG(VGG_CFG["B"], k),
    "vgg8": lambda k: RefVGG(VGG_CFG["S"], k),
}


def _randomised_reference(arch: str, num_classes: int, seed: int) -> nn.Module:
    """The reference model in float64 with random weights and BN statistics (eval-mode BN is not the identity):
    He-normal convs and linears, BN scales near 1, small shifts and means, variances in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    model = REFERENCE[arch](num_classes).double().eval()
    with torch.no_grad():
        for key, v in model.state_dict().items():
            if not v.dtype.is_floating_point:
                continue
            r = torch.randn(v.shape, generator=g, dtype=v.dtype)
            if key.endswith("running_var"):
                v.copy_(torch.rand(v.shape, generator=g, dtype=v.dtype) + 0.5)
            elif v.dim() > 1:
                v.copy_(r * (2.0 / v[0].numel()) ** 0.5)
            else:
                v.copy_(1 + 0.2 * r if key.endswith("weight") else 0.1 * r)
    return model


def _write_checkpoint(model: nn.Module, path: Path) -> Path:
    """The reference's file: float32 weights under 'model', with the epoch, accuracy and SGD state beside them."""
    state = {k: v.float() if v.dtype.is_floating_point else v for k, v in model.state_dict().items()}
    params = list(model.parameters())
    optimizer = {"state": {i: {"momentum_buffer": torch.zeros(p.shape)} for i, p in enumerate(params[:2])},
                 "param_groups": [{"lr": 0.0005, "momentum": 0.9, "dampening": 0, "weight_decay": 0.0005,
                                   "nesterov": False, "params": list(range(len(params)))}]}
    torch.save({"epoch": 240, "model": state, "accuracy": torch.tensor(73.5), "optimizer": optimizer}, path)
    return path


def _load_into_zoo(arch: str, path: Path, num_classes: int) -> nn.Module:
    model = CIFAR_MODELS[arch](num_classes)
    load_model_weights(model, path, arch, "teacher", "--teacher", "imagenet, train, random")
    return model.double().eval()


@pytest.mark.parametrize("arch", sorted(REFERENCE))
def test_a_reference_checkpoint_loads_into_the_zoo_with_the_same_logits(tmp_path: Path, arch: str) -> None:
    reference = _randomised_reference(arch, 100, seed=sorted(REFERENCE).index(arch))
    path = _write_checkpoint(reference, tmp_path / "ckpt_epoch_240.pth")
    stored = torch.load(path, weights_only=True)["model"]
    reference.load_state_dict(stored)  # the float32 values of the file, in float64: both models read the same
    ours = _load_into_zoo(arch, path, 100)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert expected.std() > 0.1  # logits that differ between classes and inputs: the comparison has teeth
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert set(ours.state_dict()) == set(stored)  # the same tensors under the same names, nothing left over


def test_a_checkpoint_of_another_architecture_is_refused_with_one_line(tmp_path: Path) -> None:
    from distillistic.errors import CheckpointError

    path = _write_checkpoint(_randomised_reference("resnet56", 100, seed=0), tmp_path / "r56.pth")
    with pytest.raises(CheckpointError, match="does not fit architecture 'resnet32x4'") as info:
        _load_into_zoo("resnet32x4", path, 100)
    assert "\n" not in str(info.value)


def _normalised(data: np.ndarray) -> torch.Tensor:
    """uint8 rows [N, 3072] as the run reads them: [N, 3, 32, 32] / 255, CIFAR-100 mean and std, in float64."""
    mean = torch.tensor(CIFAR100_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR100_STD, dtype=torch.float64).view(1, 3, 1, 1)
    return (torch.from_numpy(data.astype(np.float64)).view(-1, 3, 32, 32) / 255 - mean) / std


def _images(n: int, seed: int) -> np.ndarray:
    """Flat-coloured noisy images (a random colour each), uint8 rows [n, 3072] in CIFAR's plane order."""
    rng = np.random.default_rng(seed)
    colours = np.repeat(rng.uniform(0, 255, size=(n, 3, 1)), 1024, axis=2).reshape(n, 3072)
    return np.clip(colours + rng.normal(0, 30, size=(n, 3072)), 0, 255).astype(np.uint8)


def _teacher_for(images: np.ndarray, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A random resnet8x4 reference whose head is centred on these images' mean embedding (its bias is
    -W mean(f)), so that its predictions spread over many classes instead of one; and that embedding of every
    image (the input of ``fc``). Its weights are float32 values (in float64), as its file will hold them, so the
    embedding is the one the reloaded reference computes: one float64 forward serves both."""
    model = _randomised_reference("resnet8x4", 100, seed)
    embedding: list[torch.Tensor] = []
    hook = model.fc.register_forward_hook(lambda _m, inp, _o: embedding.append(inp[0]))
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.dtype.is_floating_point:
                v.copy_(v.float().double())
        model(_normalised(images))
        hook.remove()
        model.fc.bias.copy_(-model.fc.weight @ embedding[0].mean(0))
    return model, embedding[0]


def _write_cifar100(root: Path, splits: dict[str, tuple[np.ndarray, torch.Tensor]]) -> None:
    """A CIFAR-100 folder in the original format (Python 2 pickles) holding ``splits`` (file: (rows, labels))."""
    spec = CIFAR["cifar100"]
    folder = root / spec.folder
    folder.mkdir(parents=True)
    for name, (data, labels) in splits.items():
        entry: dict[bytes, Any] = {spec.labels_key.encode(): [int(y) for y in labels], b"data": data}
        (folder / name).write_bytes(py2_pickle(entry))
    (folder / spec.meta).write_bytes(py2_pickle({spec.names_key.encode(): [f"c{c}".encode() for c in range(100)]}))
    trust("cifar100", folder)  # the reader checks extracted files' md5s: these synthetic ones are known from here on


@pytest.mark.e2e
def test_a_run_with_a_reference_teacher_reports_the_references_accuracy(tmp_path: Path) -> None:
    """Every label is the reference teacher's prediction, so the loaded teacher scores 1.0 on the run's test split
    (a wrong key mapping or a left-out buffer scores near chance)."""
    from distillistic.training.run import train

    images = _images(400, seed=3)
    reference, embedding = _teacher_for(images, seed=11)
    path = _write_checkpoint(reference, tmp_path / "resnet8x4.pth")
    reference.load_state_dict(torch.load(path, weights_only=True)["model"])  # fc's bias rounded to float32
    with torch.no_grad():
        logits = reference.fc(embedding)  # the reloaded reference's logits: its body's weights were already these
    top2 = logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3 * logits.abs().amax(1)  # no near-tie that float32 rounding could flip
    images, labels = images[clear.numpy()], logits.argmax(1)[clear]
    assert len(labels) >= 300
    assert len(set(labels.tolist())) >= 20  # many classes told apart: a check with teeth
    spec = CIFAR["cifar100"]
    _write_cifar100(tmp_path / "c100", {spec.train[0]: (images[:240], labels[:240]),
                                        spec.test[0]: (images[240:], labels[240:])})
    result = train(tiny(tmp_path / "run", dataset="cifar100", data_root=str(tmp_path / "c100"), model="resnet8",
                        teacher="resnet8x4", teacher_weights=str(path), algo="kd", epochs=1, batch_size=60))
    assert result.summary["models"]["teacher"]["test"]["top1"] == pytest.approx(1.0)
