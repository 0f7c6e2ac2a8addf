"""Model registry: torchvision classifiers with a K-class head, and small models for 8x8 / 28x28 inputs.

Every entry is built by ``build_model(name, num_classes, data_channels, image_size, weights)``.
torchvision models take 3 channels (grayscale data is expanded to RGB on the device, as the thesis's
``Grayscale(num_output_channels=3)``); the small models take the dataset's channels. ``cifar_*``
variants replace the ImageNet stem (7x7 stride-2 conv + max-pool) by a 3x3 stride-1 conv, the usual
choice for 28-32 px inputs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import typing
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distillistic.errors import CheckpointError, UserError
from distillistic.models import timm_models
from distillistic.models.cifar import CIFAR_MODELS
from distillistic.models.timm_models import Norm
from distillistic.registry import Registry

log = logging.getLogger("distillistic")

Builder = Callable[[int, int, int, bool], nn.Module]  # (num_classes, in_channels, image_size, imagenet)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Builder
    fixed_channels: int | None  # None: takes the dataset's channels
    has_imagenet_weights: bool
    family: str = "torchvision"  # torchvision, cifar (the CIFAR KD zoo), small, timm
    norm: Norm | None = None  # the (mean, std) the model reads its input with; None: the dataset's

    def channels(self, data_channels: int) -> int:
        return self.fixed_channels or data_channels


class ModelRegistry(Registry[ModelSpec]):
    """The registered models, plus any timm model as ``timm/NAME`` (looked up in timm when first named)."""

    def get(self, name: str) -> ModelSpec:
        if name.startswith(timm_models.PREFIX) and name not in self._entries:
            why = timm_models.problem(name)
            if why is not None:
                raise UserError(why)
            self._entries[name] = ModelSpec(name, _timm_builder(name), 3, True, "timm", timm_models.normalisation(name))
        return super().get(name)

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str) and name.startswith(timm_models.PREFIX):
            return timm_models.problem(name) is None
        return super().__contains__(name)

    def unknown_message(self, name: str) -> str:
        if name.startswith(timm_models.PREFIX):
            return timm_models.problem(name) or ""
        # 40-odd names do not fit one line: the closest name, a few common ones and where the whole list is
        common = ("cnn", "mlp", "resnet18", "resnet50", "resnet8x4", "wrn_40_2")
        some = ", ".join(n for n in common if n in self._entries)
        return (f"{self.unknown(name)}; choose one of {len(self._entries)} models (e.g. {some}; "
                "'distillistic list models' prints them all), or timm/NAME for a timm model")

    def names(self) -> list[str]:
        return [n for n in super().names() if not n.startswith(timm_models.PREFIX)]


def _timm_builder(name: str) -> Builder:
    def build(num_classes: int, in_channels: int, image_size: int, imagenet: bool) -> nn.Module:
        return timm_models.build(name, num_classes, in_channels, image_size, pretrained=imagenet)

    return build


MODELS: ModelRegistry = ModelRegistry("model")


def head_name(model: nn.Module) -> str:
    """Name of the classification head: the last ``nn.Linear`` of the model."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear classification head")
    return names[-1]


def replace_head(model: nn.Module, num_classes: int) -> None:
    name = head_name(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))


def _imagenet_model(name: str) -> nn.Module:
    import torchvision.models as tvm  # here, not at the top: a run of another model never imports torchvision

    weights = tvm.get_model_weights(name).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    if cached.is_file():
        # torchvision reads its cache with torch.load(weights_only=False): a file put there by hand is
        # checked first with weights_only=True, so that it cannot run pickled code.
        from distillistic.fileio import load

        try:
            load(cached)
        except CheckpointError as e:
            raise CheckpointError(f"{e} (it sits in torchvision's weights cache: delete it so that the ImageNet "
                                  f"weights of {name} are downloaded again)") from None
    said = io.StringIO()  # torch.hub prints 'Downloading: ...' on stdout before it tries: held back, told after
    try:
        with contextlib.redirect_stdout(said):
            model = tvm.get_model(name, weights=weights)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        folder = f"{torch.hub.get_dir()}/checkpoints"
        raise UserError(f"ImageNet weights for {name} are not in '{folder}' and could not be downloaded ({e}); "
                        f"put {weights.url.rsplit('/', 1)[-1]} there (or set TORCH_HOME)") from None
    if said.getvalue():
        log.info("downloaded the ImageNet weights of %s to %s", name, cached)
    return model


def _torchvision(name: str, cifar_stem: bool = False) -> Builder:
    def build(num_classes: int, in_channels: int, image_size: int, imagenet: bool) -> nn.Module:
        import torchvision.models as tvm

        if imagenet:
            model = _imagenet_model(name)
            if num_classes != 1000:  # ImageNet itself keeps its trained head
                replace_head(model, num_classes)
        else:
            model = tvm.get_model(name, weights=None, num_classes=num_classes)
        if cifar_stem:
            width = typing.cast(nn.Conv2d, model.conv1).out_channels
            model.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        return model

    return build


for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
              "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
              "efficientnet_b1", "convnext_tiny", "regnet_y_400mf", "shufflenet_v2_x1_0", "densenet121",
              "vgg11_bn"):
    MODELS.add(_name, ModelSpec(_name, _torchvision(_name), 3, True))
for _name in ("resnet18", "resnet34", "resnet50"):
    MODELS.add(f"cifar_{_name}", ModelSpec(f"cifar_{_name}", _torchvision(_name, cifar_stem=True), 3, True))


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """conv-BN-ReLU blocks, a max-pool after each stage while the map is >= 8 px, global average pool."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size, cin = image_size, in_channels
        for i, w in enumerate(widths):
            layers += [_conv_block(cin, w), _conv_block(w, w)] if i else [_conv_block(cin, w)]
            if size >= 8 and i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, C, H, W]`` -> logits ``[B, K]``."""
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class MLP(nn.Module):
    """Flatten -> two hidden ReLU layers -> K logits."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, hidden),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, hidden), nn.ReLU(inplace=True))
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, C, S, S]`` -> logits ``[B, K]``."""
        return self.fc(self.net(x))


def _small(factory: Callable[[int, int, int], nn.Module]) -> Builder:
    def build(num_classes: int, in_channels: int, image_size: int, imagenet: bool) -> nn.Module:
        return factory(num_classes, in_channels, image_size)

    return build


MODELS.add("mlp", ModelSpec("mlp", _small(MLP), None, False, "small"))
# Wider MLPs with the parameters of a cohort of 2 or 3 ``mlp`` students at 1 x 28 x 28 and 10 classes
# (hidden h: h² + 796 h + 10 parameters; 437 -> 538,831 ≈ 2 x 269,322; 585 -> 807,895 ≈ 3 x 269,322).
MODELS.add("mlp_x2", ModelSpec("mlp_x2", _small(lambda k, c, s: MLP(k, c, s, hidden=437)), None, False, "small"))
MODELS.add("mlp_x3", ModelSpec("mlp_x3", _small(lambda k, c, s: MLP(k, c, s, hidden=585)), None, False, "small"))
MODELS.add("cnn", ModelSpec("cnn", _small(lambda k, c, s: SmallCNN(k, c, s, (32, 64))), None, False, "small"))
MODELS.add("cnn_wide", ModelSpec("cnn_wide", _small(lambda k, c, s: SmallCNN(k, c, s, (64, 128, 256))), None, False,
                                  "small"))


def _zoo(name: str) -> Builder:
    def build(num_classes: int, in_channels: int, image_size: int, imagenet: bool) -> nn.Module:
        return CIFAR_MODELS[name](num_classes, in_channels)

    return build


for _name in CIFAR_MODELS:  # the CIFAR KD zoo (models/cifar.py): resnet8 ... shufflenetv2
    MODELS.add(_name, ModelSpec(_name, _zoo(_name), None, False, "cifar"))


def parameter_count(name: str, num_classes: int, data_channels: int = 3, image_size: int = 32) -> int:
    """Parameters of model ``name`` with a ``num_classes`` head, built on the meta device (no memory, no init).

    A builder that reads tensor values while building (regnet) is built for real with a one-class head, and
    the head's other ``num_classes - 1`` rows are counted: no class count ever allocates its head."""
    spec = MODELS.get(name)
    try:
        with torch.device("meta"):
            model = spec.build(num_classes, spec.channels(data_channels), image_size, False)
    except (NotImplementedError, RuntimeError):
        model = spec.build(1, spec.channels(data_channels), image_size, False)
        head = model.get_submodule(head_name(model))
        assert isinstance(head, nn.Linear)
        row = head.in_features + (1 if head.bias is not None else 0)
        return sum(p.numel() for p in model.parameters()) + (num_classes - 1) * row
    return sum(p.numel() for p in model.parameters())


def memory_bytes() -> int:
    """This machine's physical memory in bytes (0 when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_fits(name: str, num_classes: int, data_channels: int, image_size: int, role: str) -> None:
    """Refuse, before anything is built or written, a model that cannot read ``image_size`` px (its feature maps
    shrink to nothing) or whose weights alone exceed this machine's memory. ``role``: 'student', 'teacher'."""
    spec = MODELS.get(name)
    channels = spec.channels(data_channels)
    count = parameter_count(name, num_classes, data_channels, image_size)
    memory = memory_bytes()
    if memory and 4 * count > memory:
        raise UserError(f"the {role} '{name}' for {num_classes} classes at {image_size} px has {count:,d} parameters "
                        f"({_size(4 * count)} in fp32), more than this machine's {_size(memory)}; "
                        "choose a smaller model, fewer classes or a smaller --image-size")
    if not _reads(spec, channels, image_size):
        least = next((s for s in (2 ** i for i in range(1, 11)) if s > image_size and _reads(spec, channels, s)), None)
        hint = f"use --image-size (or the {role}'s resolution) of at least {least} px" if least else "use another model"
        raise UserError(f"the {role} '{name}' cannot read {image_size} px images (its feature maps shrink to "
                        f"nothing); {hint}, or choose a model for small images")


def _size(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def _reads(spec: ModelSpec, channels: int, size: int) -> bool:
    """Whether a forward of one ``size`` px image runs (on the meta device: shapes only, no memory)."""
    try:
        with torch.device("meta"):
            model = spec.build(2, channels, size, False).eval()
            model(torch.empty(1, channels, size, size))
    except NotImplementedError:  # a builder or layer that needs real values: not checkable here, not refused
        return True
    except (RuntimeError, ValueError, AssertionError) as e:
        return "meta" in str(e)
    return True


def build_model(name: str, num_classes: int, data_channels: int, image_size: int, imagenet: bool = False,
                freeze_backbone: bool = False) -> nn.Module:
    """A fresh model (initialised from torch's global generator; seed it before calling)."""
    spec = MODELS.get(name)
    if imagenet and not spec.has_imagenet_weights:
        raise UserError(f"model '{name}' has no ImageNet weights; use random or a checkpoint path")
    model = spec.build(num_classes, spec.channels(data_channels), image_size, imagenet)
    if freeze_backbone:
        head = head_name(model) + "."
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith(head))
    return model
