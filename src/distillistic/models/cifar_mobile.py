"""The CIFAR zoo's mobile students (RepDistiller ``models/mobilenetv2.py``, ``ShuffleNetv1.py``,
``ShuffleNetv2.py``). The zoo's registry and its notes are in :mod:`distillistic.models.cifar`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distillistic.models.cifar_convnets import init_weights

__all__ = ["CifarMobileNetV2", "ShuffleNetV1", "ShuffleNetV2"]


def _shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Channel shuffle (ShuffleNet, Zhang et al. 2018, Sec. 3.1): [N, g*c, H, W] -> [N, c*g, H, W] transposed."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


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
        init_weights(self, 0.01)

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
