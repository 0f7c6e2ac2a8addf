"""The CIFAR knowledge-distillation benchmark zoo: the teacher/student networks of the CRD benchmark.

Architectures, widths and depths follow Tian et al., "Contrastive Representation Distillation" (ICLR 2020),
Table 1/2, whose code (HobbitLong/RepDistiller ``models/``; megvii-research/mdistiller ``models/cifar`` holds the
same modules) every later CIFAR KD paper reuses. Parameter and buffer names (``state_dict`` keys) and shapes are
those of the reference, so its released CIFAR-100 teachers load with ``load_state_dict(..., strict=True)``, and
at 32 px the logits are the reference's. Differences, none of which changes a parameter or a 32 px output:

* ``forward(x) -> logits [N, K]`` only; intermediate features are taken with forward hooks on the submodules
  named in :data:`CIFAR_STAGES` (the reference's ``is_feat`` list ``feats[1:-1]``, non-pre-activation form).
* the stem takes ``in_channels`` (1 for grayscale data); the final pooling is adaptive, so 28 px inputs work.
* VGG's ReLU after each block is the last module of the block (the reference applies ``F.relu`` in forward).

Inputs are ``[N, in_channels, H, W]`` images (H = W = 32 for CIFAR); outputs are logits ``[N, K]``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CIFAR_CLASSIFIER", "CIFAR_MODELS", "CIFAR_STAGES", "mobilenetv2", "resnet8", "resnet8x4", "resnet14",
           "resnet20", "resnet32", "resnet32x4", "resnet44", "resnet56", "resnet110", "shufflenetv1", "shufflenetv2",
           "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]


def _init_weights(model: nn.Module, linear_std: float | None) -> None:
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


def _shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Channel shuffle (ShuffleNet, Zhang et al. 2018, Sec. 3.1): [N, g*c, H, W] -> [N, c*g, H, W] transposed."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


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
        _init_weights(self, None)

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
        _init_weights(self, None)
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
_VGG_CFG: dict[int, list[list[int]]] = {
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
        _init_weights(self, 0.01)

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


# -------------------------------------------------------------------------------------------- MobileNetV2
def _conv_bn_relu(c_in: int, c_out: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class _InvertedResidual(nn.Module):
    """Sandler et al. 2018 block: 1x1 expand (x t) - 3x3 depthwise - 1x1 linear projection, + x when shapes match.
    The expansion conv is kept for t = 1 too, as the reference does."""

    def __init__(self, inp: int, oup: int, stride: int, t: int) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and inp == oup
        hid = inp * t
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hid, 1, 1, 0, bias=False), nn.BatchNorm2d(hid), nn.ReLU(inplace=True),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid), nn.ReLU(inplace=True),
            nn.Conv2d(hid, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 (RepDistiller's ``mobile_half``): stride-2 stem, the seven (t, c, n, s) groups of Table 2 with
    the first two at stride 1 (CIFAR strides), 1x1 conv to 1280, global pool, Linear(1280, K)."""

    SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1))

    def __init__(self, num_classes: int, in_channels: int, width: float = 0.5, expansion: int = 6) -> None:
        super().__init__()
        c_in = int(32 * width)
        self.conv1 = _conv_bn_relu(in_channels, c_in, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in self.SETTING:
            c_out, layers = int(c * width), []
            for i in range(n):
                layers.append(_InvertedResidual(c_in, c_out, s if i == 0 else 1, expansion if t != 1 else 1))
                c_in = c_out
            self.blocks.append(nn.Sequential(*layers))
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _conv_bn_relu(c_in, last, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the reference's AvgPool2d(2, ceil_mode=True) at 32 px
        _init_weights(self, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> logits [N, K]."""
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(torch.flatten(self.avgpool(self.conv2(x)), 1))


# -------------------------------------------------------------------------------------------- ShuffleNetV1
class _ShuffleV1Unit(nn.Module):
    """Zhang et al. 2018 unit (Fig. 2b/c): grouped 1x1 - shuffle - 3x3 depthwise - grouped 1x1; add (stride 1) or
    concatenate with a 3x3 average pool of x (stride 2). The first unit after the 24-channel stem is not grouped."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride, mid = stride, out_planes // 4
        self.g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, 2, 1)) if stride == 2 else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))  # reference: ReLU after the depthwise BN
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    """ShuffleNet 1x, g = 3 (widths 240/480/960, 4/8/4 units) with a 1x1 stride-1 stem of 24 for 32 px input."""

    def __init__(self, num_classes: int, in_channels: int, groups: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        c_in, stages = 24, []
        for width, n in ((240, 4), (480, 8), (960, 4)):
            # a stride-2 unit concatenates its c_in input channels, so its branch makes width - c_in
            units = [_ShuffleV1Unit(c_in if i == 0 else width, width - (c_in if i == 0 else 0), 2 if i == 0 else 1,
                                    groups) for i in range(n)]
            stages.append(nn.Sequential(*units))
            c_in = width
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(960, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> logits [N, K]."""
        x = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# -------------------------------------------------------------------------------------------- ShuffleNetV2
class _ShuffleV2Unit(nn.Module):
    """Ma et al. 2018 basic unit (Fig. 3c): split channels in halves, 1x1 - 3x3 dw - 1x1 on one, concat, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels // 2
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2))))))))
        return _shuffle(torch.cat([x1, out], 1), 2)


class _ShuffleV2Down(nn.Module):
    """Ma et al. 2018 down-sampling unit (Fig. 3d): both branches at stride 2, each to half the output width."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_out // 2
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in)
        self.conv2, self.bn2 = nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv4, self.bn4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False), nn.BatchNorm2d(mid)
        self.conv5, self.bn5 = nn.Conv2d(mid, mid, 1, bias=False), nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x))))))))
        return _shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 1x (widths 116/232/464, 3/7/3 units after each down unit, 1x1 conv to 1024), 1x1 stem of 24."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        c_in, stages = 24, []
        for width, n in ((116, 3), (232, 7), (464, 3)):
            stages.append(nn.Sequential(_ShuffleV2Down(c_in, width), *[_ShuffleV2Unit(width) for _ in range(n)]))
            c_in = width
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(464, 1024, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1024)
        self.linear = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> logits [N, K]."""
        x = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------------- registry
class Builder(Protocol):
    """``(num_classes, in_channels=3) -> model``; also usable as a ``Callable[[int, int], nn.Module]``."""

    __name__: str

    def __call__(self, num_classes: int, in_channels: int = 3) -> nn.Module: ...


def _builder(name: str, cls: Callable[..., nn.Module], *args: object) -> Builder:
    def build(num_classes: int, in_channels: int = 3) -> nn.Module:
        return cls(*args, num_classes=num_classes, in_channels=in_channels)
    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{name} for CIFAR (RepDistiller ``models.model_dict``): (num_classes, in_channels=3) -> model."
    return build


_THIN, _X4 = (16, 16, 32, 64), (32, 64, 128, 256)
resnet8, resnet14, resnet20 = (_builder(f"resnet{d}", CifarResNet, d, _THIN) for d in (8, 14, 20))
resnet32, resnet44, resnet56, resnet110 = (_builder(f"resnet{d}", CifarResNet, d, _THIN) for d in (32, 44, 56, 110))
resnet8x4, resnet32x4 = (_builder(f"resnet{d}x4", CifarResNet, d, _X4) for d in (8, 32))
wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2 = (_builder(f"wrn_{d}_{k}", WideResNet, d, k)
                                          for d, k in ((16, 1), (16, 2), (40, 1), (40, 2)))
vgg8, vgg11, vgg13, vgg16, vgg19 = (_builder(f"vgg{d}", CifarVGG, _VGG_CFG[d]) for d in (8, 11, 13, 16, 19))
mobilenetv2 = _builder("mobilenetv2", CifarMobileNetV2)  # RepDistiller's mobile_half: width 0.5, expansion 6
shufflenetv1 = _builder("shufflenetv1", ShuffleNetV1)  # RepDistiller's ShuffleV1: ShuffleNet 1x, g = 3
shufflenetv2 = _builder("shufflenetv2", ShuffleNetV2)  # RepDistiller's ShuffleV2: ShuffleNetV2 1x

CIFAR_MODELS: dict[str, Builder] = {b.__name__: b for b in (
    resnet8, resnet14, resnet20, resnet32, resnet44, resnet56, resnet110, resnet8x4, resnet32x4,
    wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2, vgg8, vgg11, vgg13, vgg16, vgg19, mobilenetv2, shufflenetv1, shufflenetv2)}
_RESNETS, _WRNS, _VGGS = (tuple(m for m in CIFAR_MODELS if m.startswith(p)) for p in ("resnet", "wrn", "vgg"))

# Feature-distillation taps: the output of each named submodule is the reference's ``feats[i]`` (i = 1, 2, 3[, 4]),
# a [N, C_i, H_i, W_i] map with H_i non-increasing. Activation state of those maps (as in the reference's
# default, non-``preact`` features):
#   ResNet, VGG, ShuffleNetV1: post-ReLU.   ShuffleNetV2: non-negative (every channel last went through a ReLU).
#   WRN: pre-activation residual sums (the block's BN-ReLU comes at the start of the next stage / the head).
#   MobileNetV2: the linear bottleneck (BN output, no ReLU), blocks 1, 2, 4, 6 as in the reference.
CIFAR_STAGES: dict[str, dict[str, str]] = {
    **{m: {"stage1": "layer1", "stage2": "layer2", "stage3": "layer3"} for m in _RESNETS},
    **{m: {"stage1": "block1", "stage2": "block2", "stage3": "block3"} for m in _WRNS},
    **{m: {"stage1": "block1", "stage2": "block2", "stage3": "block3", "stage4": "block4"} for m in _VGGS},
    "mobilenetv2": {"stage1": "blocks.1", "stage2": "blocks.2", "stage3": "blocks.4", "stage4": "blocks.6"},
    "shufflenetv1": {"stage1": "layer1", "stage2": "layer2", "stage3": "layer3"},
    "shufflenetv2": {"stage1": "layer1", "stage2": "layer2", "stage3": "layer3"},
}

# The final nn.Linear (also the last nn.Linear in named_modules() order); its input is the pooled embedding.
CIFAR_CLASSIFIER: dict[str, str] = {
    **{m: "fc" for m in (*_RESNETS, *_WRNS)},
    **{m: "classifier" for m in _VGGS},
    "mobilenetv2": "classifier.0",
    "shufflenetv1": "linear",
    "shufflenetv2": "linear",
}
