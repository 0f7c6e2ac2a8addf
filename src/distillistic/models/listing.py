"""``distillistic list models``: every registered model by family, with its parameter count for K classes."""

from __future__ import annotations

from distillistic.errors import UserError, short_repr
from distillistic.models import timm_models
from distillistic.models.builders import MODELS, parameter_count

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
        lines.append(f"{fam} ({len(names)} models; parameters for {num_classes} classes, 3 x 32 x 32 input):")
        width = max(len(n) for n in names)
        lines += [f"  {n:<{width}}  {parameter_count(n, num_classes):>12,d}" for n in names]
    return lines
