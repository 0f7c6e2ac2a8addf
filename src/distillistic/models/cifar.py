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

The networks are in :mod:`distillistic.models.cifar_convnets` (ResNet, WRN, VGG) and
:mod:`distillistic.models.cifar_mobile` (MobileNetV2, ShuffleNetV1/V2); this module is their registry.

Inputs are ``[N, in_channels, H, W]`` images (H = W = 32 for CIFAR); outputs are logits ``[N, K]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import nn

from distillistic.models.cifar_convnets import VGG_CFG, CifarResNet, CifarVGG, WideResNet
from distillistic.models.cifar_mobile import CifarMobileNetV2, ShuffleNetV1, ShuffleNetV2

__all__ = ["CIFAR_CLASSIFIER", "CIFAR_MODELS", "CIFAR_STAGES", "CifarMobileNetV2", "CifarResNet", "CifarVGG",
           "ShuffleNetV1", "ShuffleNetV2", "WideResNet", "mobilenetv2", "resnet8", "resnet8x4", "resnet14",
           "resnet20", "resnet32", "resnet32x4", "resnet44", "resnet56", "resnet110", "shufflenetv1", "shufflenetv2",
           "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]


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
vgg8, vgg11, vgg13, vgg16, vgg19 = (_builder(f"vgg{d}", CifarVGG, VGG_CFG[d]) for d in (8, 11, 13, 16, 19))
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
