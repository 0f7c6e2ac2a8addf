"""The strong view a term may read (multi-level logit distillation's): the run's augmentation drawn on keys of its
own, then RandAugment(2, 10); made ahead by ``prepare`` or on demand, the same pixels either way."""

from __future__ import annotations

import pytest
import torch

from distillistic.data.augment import BatchRandAugment, SampleKeys
from distillistic.data.crop_flip import BatchCropFlip
from distillistic.data.loader import Batch, DataInfo
from distillistic.data.views import STRONG_VIEW, ViewMaker

pytestmark = pytest.mark.unit


def _maker(augment: str, strong: bool, dtype: torch.dtype = torch.float32) -> ViewMaker:
    info = DataInfo("x", 10, 3, 16, (0.3, 0.5, 0.2), (0.2, 0.25, 0.3), tuple("0123456789"), {}, "", None)
    return ViewMaker(info, augment, 11, torch.device("cpu"), dtype=dtype, strong=strong)


def _batch(epoch: int = 2) -> Batch:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 16, 16), generator=g, dtype=torch.uint8)
    return Batch(images, torch.zeros(6, dtype=torch.long), torch.tensor([5, 1, 9, 2, 7, 3]), epoch)


@pytest.mark.parametrize("augment", ["none", "cifar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strong_view_is_the_runs_augmentation_then_randaugment_on_its_own_keys(augment: str,
                                                                              dtype: torch.dtype) -> None:
    maker, batch = _maker(augment, True, dtype), _batch()
    keys = SampleKeys(11, 2, batch.index, STRONG_VIEW)
    pixels = BatchCropFlip()(batch.images, keys) if augment == "cifar" else batch.images
    pixels = BatchRandAugment((16, 16), num_ops=2, magnitude=10)(pixels, keys)
    expected = (pixels.to(dtype) / 255 - maker.mean) / maker.std
    lazy = maker.strong_views(batch)
    assert lazy is not None
    assert lazy.base.dtype == dtype
    assert torch.equal(lazy.base, expected)
    (prepared,) = list(maker.prepare([batch]))
    ahead = maker.strong_views(prepared)
    assert ahead is not None
    assert prepared.strong is not None
    assert torch.equal(ahead.base, expected)  # made ahead or on demand: the same pixels
    assert torch.equal(maker(prepared, train=True).base, maker(batch, train=True).base)  # the run's view unchanged
    assert not torch.equal(lazy.base, maker(batch, train=True).base)
    other = maker.strong_views(_batch(epoch=3))
    assert other is not None
    assert not torch.equal(other.base, expected)  # a new draw each epoch


def test_no_strong_view_unless_asked() -> None:
    maker, batch = _maker("none", False), _batch()
    assert maker.strong_views(batch) is None
    (same,) = list(maker.prepare([batch]))
    assert same is batch  # nothing to make ahead
