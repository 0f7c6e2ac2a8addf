"""The CIFAR zoo's ResNets, wide ResNets and VGGs (RepDistiller ``models/resnet.py``, ``wrn.py``, ``vgg.py``), with
the weight initialisation every zoo model uses. The zoo's registry and its notes are in
:mod:`distillistic.models.cifar`."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VGG_CFG", "CifarResNet", "CifarVGG", "WideResNet", "init_weights"]


def init_weights(model: nn.Module, linear_std: float | None) -> None:
    """He-normal convs (std sqrt(2 / (k*k*C_out)), the reference's fan-out rule), unit BN; Linear: N(0, std^2)
    weights and zero bias when ``linear_std`` is given, PyTorch's default otherwise."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------- ResNet (CIFAR)
class _ResBlock(nn.Module):
    """He et al. 2016 basic block, post-activation: relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))."""

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None  # 1x1 projection shortcut (option B) only where shapes change
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32 px: 3x3 stem, three stages of n blocks at strides 1, 2, 2, global pool, Linear."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int, in_channels: int) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet's depth is 6n+2, not {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(widths[0], widths[1], n, 1)
        self.layer2 = self._stage(widths[1], widths[2], n, 2)
        self.layer3 = self._stage(widths[2], widths[3], n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the reference's AvgPool2d(8) on the 8x8 map of a 32 px input
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self, None)

    @staticmethod
    def _stage(inplanes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*[_ResBlock(inplanes if i == 0 else planes, planes, stride if i == 0 else 1)
                               for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> logits [N, K]."""
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ------------------------------------------------------------------------------------------- Wide ResNet
class _WideBlock(nn.Module):
    """Zagoruyko & Komodakis 2016 pre-activation block: conv2(relu(bn2(conv1(relu(bn1 x))))) + shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        # Where the width changes, the 1x1 shortcut reads the pre-activated input (as the reference does).
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class WideResNet(nn.Module):
    """WRN-d-k (d = 6n+4): 3x3 stem of 16, stages of widths 16k, 32k, 64k at strides 1, 2, 2, BN-ReLU, pool."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a wide ResNet's depth is 6n+4, not {depth}")
        n, w = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.block1, self.block2, self.block3 = (self._stage(n, w[i], w[i + 1], 2 if i else 1) for i in range(3))
        self.bn1 = nn.BatchNorm2d(w[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(w[3], num_classes)
        init_weights(self, None)
        nn.init.zeros_(self.fc.bias)  # the reference zeroes the bias and keeps the default weight

    @staticmethod
    def _stage(n: int, c_in: int, c_out: int, stride: int) -> nn.Sequential:
        """A stage of ``n`` blocks, nested as ``.layer`` so that parameter names are the reference's."""
        blocks = [_WideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1) for i in range(n)]
        return nn.Sequential(OrderedDict(layer=nn.Sequential(*blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> logits [N, K]."""
        x = self.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ------------------------------------------------------------------------------------------------ VGG (BN)
VGG_CFG: dict[int, list[list[int]]] = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


class CifarVGG(nn.Module):
    """Simonyan & Zisserman's VGG with BN and the CIFAR head (no FC stack): five conv blocks, max-pools after
    blocks 0-2 (and 3 for 64 px input, as the reference), global average pool, one Linear(512, K)."""

    def __init__(self, cfg: list[list[int]], num_classes: int, in_channels: int) -> None:
        super().__init__()
        widths = [in_channels] + [c[-1] for c in cfg]
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            self._block(cfg[i], widths[i]) for i in range(5))
        self.pool0, self.pool1, self.pool2, self.pool3 = (nn.MaxPool2d(2, 2) for _ in range(4))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)
        init_weights(self, 0.01)

    @staticmethod
    def _block(cfg: list[int], c_in: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for v in cfg:
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c_in = v
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> logits [N, K]."""
        tiny_imagenet = x.shape[2] == 64
        x = self.pool2(self.block2(self.pool1(self.block1(self.pool0(self.block0(x))))))
        x = self.block3(x)
        x = self.block4(self.pool3(x) if tiny_imagenet else x)
        return self.classifier(torch.flatten(self.pool4(x), 1))
