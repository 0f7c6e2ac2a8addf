"""``distillistic list models``: every registered model by family, with its parameters and MACs for K classes.

MACs (multiply-accumulates of one image's forward, at 3 x 32 x 32) are counted by PyTorch's
``FlopCounterMode`` on a model built on the meta device (:mod:`distillistic.models.costs`).
"""

from __future__ import annotations

import torch
from torch import nn

from distillistic.errors import UserError, short_repr
from distillistic.models import timm_models
from distillistic.models.builders import MODELS, head_name, parameter_count
from distillistic.models.costs import forward_cost

FAMILIES = ("torchvision", "cifar", "small", "timm")
MAX_CLASSES = 1_000_000  # ImageNet-21k has 21,841; counting a head is free, but a count must stay meaningful


def model_table(num_classes: int, family: str | None = None) -> list[str]:
    """Lines ``family: name  params`` for every model (of ``family``), parameters counted for ``num_classes``."""
    if family is not None and family not in FAMILIES:
        raise UserError(f"unknown model family '{family}'; choose one of: {', '.join(FAMILIES)}")
    if not 1 <= num_classes <= MAX_CLASSES:
        raise UserError(f"--num-classes must be a whole number in [1, {MAX_CLASSES:,d}], not {short_repr(num_classes)}")
    lines = []
    for fam in FAMILIES:
        if family not in (None, fam):
            continue
        if fam == "timm":
            state = "installed" if timm_models.available() else f"not installed: {timm_models.EXTRA}"
            lines.append(f"timm: any timm model as timm/NAME, e.g. timm/resnet10t ({state})")
            continue
        names = [n for n in MODELS.names() if MODELS.get(n).family == fam]
        lines.append(f"{fam} ({len(names)} models; parameters and MACs per image for {num_classes} classes, "
                     "3 x 32 x 32 input):")
        width = max(len(n) for n in names)
        lines += [f"  {n:<{width}}  {parameter_count(n, num_classes):>12,d}  {_text(mac_count(n, num_classes)):>15}"
                  for n in names]
    return lines


def _text(macs: int | None) -> str:
    return "–" if macs is None else f"{macs:,d}"


def mac_count(name: str, num_classes: int, data_channels: int = 3, image_size: int = 32) -> int | None:
    """MACs of one image's forward through model ``name`` (None where the model cannot read that input).

    Built on the meta device; a builder that reads tensor values while building (regnet) is built for
    real with a one-class head, and the head's other ``num_classes - 1`` outputs are added."""
    spec = MODELS.get(name)
    channels = spec.channels(data_channels)
    shape = (channels, image_size, image_size)
    try:
        try:
            with torch.device("meta"):
                model = spec.build(num_classes, channels, image_size, False)
            return forward_cost(model, shape)["macs"]
        except NotImplementedError:
            model = spec.build(1, channels, image_size, False)
            head = model.get_submodule(head_name(model))
            extra = (num_classes - 1) * head.in_features if isinstance(head, nn.Linear) else 0
            return forward_cost(model, shape)["macs"] + extra
    except (RuntimeError, ValueError, NotImplementedError):
        return None
