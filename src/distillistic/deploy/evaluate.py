"""Models run on a split of their run: the run's own evaluation path, an ONNX session, and the comparison.

The reference logits come from the code that evaluated the run (:class:`~distillistic.data.views.ViewMaker`
and :func:`~distillistic.core.signals.model_view`), not from :class:`~distillistic.deploy.graph.Preprocessed`,
so parity checks the export against what the run measured, preprocessing included.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distillistic.config import Config
from distillistic.core.metrics import MetricAccumulator
from distillistic.core.signals import model_view
from distillistic.data.datasets import Source
from distillistic.data.loader import Batch, DataInfo, EpochSampler, Loader
from distillistic.data.views import ViewMaker
from distillistic.deploy.graph import Preprocessed
from distillistic.errors import UserError

TOLERANCE = 1e-4  # largest |z_onnx - z_torch| of a sample over its largest |z_torch| (at least 1)


def batches(source: Source, info: DataInfo, cfg: Config, batch_size: int = 256) -> Iterator[tuple[Tensor, Tensor]]:
    """uint8 images ``[B, C, S, S]`` and labels of ``source`` in order, as the run's evaluation reads them."""
    assert cfg.data_seed is not None
    sampler = EpochSampler(source.labels, batch_size, cfg.data_seed, False)
    loader = Loader(source, sampler, info.image_size, False, cfg.data_seed, workers=0)
    for batch in loader.epoch(0):
        yield batch.images, batch.labels


@torch.no_grad()
def reference_logits(module: Preprocessed, source: Source, info: DataInfo, cfg: Config) -> tuple[Tensor, Tensor]:
    """Logits ``[N, K]`` (float64) of the student on ``source`` through the run's evaluation code, and labels."""
    views = ViewMaker(info, "none", cfg.data_seed or 0, torch.device("cpu"))
    inp, model = module.inputs, module.model.eval()
    channels = inp.model_channels or inp.channels
    out, labels = [], []
    for images, y in batches(source, info, cfg):
        view = views(Batch(images, y, torch.arange(len(y)), 0), train=False)
        out.append(model(model_view(view, inp.view_size, channels, inp.norm)).double())
        labels.append(y)
    return torch.cat(out), torch.cat(labels)


def session_logits(session: Any, source: Source, info: DataInfo, cfg: Config) -> Tensor:
    """Logits ``[N, K]`` (float64) of an ONNX Runtime session on ``source``."""
    name = session.get_inputs()[0].name
    out = [torch.from_numpy(np.asarray(session.run(None, {name: images.numpy()})[0])).double()
           for images, _ in batches(source, info, cfg)]
    return torch.cat(out)


def scores(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Test top-1, ECE (15 bins) and NLL of logits ``[N, K]``."""
    acc = MetricAccumulator(logits.shape[1])
    acc.update(logits.double(), labels)
    out = acc.compute()
    return {k: float(out[k]) for k in ("top1", "ece", "nll")} | {"n": len(labels)}


@dataclass
class Parity:
    """How an export's logits compare with the PyTorch student's on the same images."""

    worst_sample: int
    worst_gap: float  # relative: max_k |a - b| / max(1, max_k |b|) of the worst sample
    top1_agree: float
    flipped: int  # samples whose top-1 differs

    def to_json(self) -> dict[str, Any]:
        return {"tolerance": TOLERANCE, "worst_sample": self.worst_sample, "worst_relative_gap": self.worst_gap,
                "top1_agreement": self.top1_agree, "top1_differs": self.flipped}


def compare(got: Tensor, ref: Tensor) -> Parity:
    """The largest relative gap (which sample) and the top-1 agreement of ``got`` against ``ref``."""
    gap = (got - ref).abs().amax(dim=1) / ref.abs().amax(dim=1).clamp_min(1.0)
    same = got.argmax(dim=1) == ref.argmax(dim=1)
    worst = int(gap.argmax()) if len(gap) else 0
    return Parity(worst, float(gap[worst]) if len(gap) else 0.0, float(same.double().mean()) if len(same) else 1.0,
                  int((~same).sum()))


def check_parity(parity: Parity, label: str, split: str) -> None:
    """Refuse an export whose logits or top-1 decisions differ from the student's, naming the worst sample."""
    if parity.worst_gap > TOLERANCE or parity.flipped:
        raise UserError(f"export: the ONNX model of '{label}' differs from the PyTorch student on the {split} split: "
                        f"sample {parity.worst_sample} has a logit gap of {parity.worst_gap:.2e} (relative; tolerance "
                        f"{TOLERANCE:.0e}), {parity.flipped} top-1 decisions differ; nothing was exported")


def check_calibration(count: int, available: int | None = None) -> None:
    """Refuse an int8 quantization with no calibration images (``count`` asked, ``available`` in the split)."""
    if count < 1 or available == 0:
        held = "" if available is None else f" (the split has {available})"
        raise UserError(f"export: --quantize int8 needs calibration images from the training split, got {count}"
                        f"{held}; pass --calibration-images N with N >= 1")


def calibration_source(source: Source, count: int, seed: int) -> Source:
    """``count`` training images drawn at random (seeded) for int8 calibration."""
    check_calibration(count, len(source))
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(source), generator=g)[: min(count, len(source))].sort().values
    return source.subset(pick)
