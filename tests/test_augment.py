"""Batched, keyed augmentation against torchvision's per-image operations."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from torchvision.transforms.autoaugment import RandAugment, _apply_op

from distillistic.data.augment import (
    BatchRandAugment,
    SampleKeys,
    crop_box,
    equalize,
    sample_hash,
    sample_hash_int,
)
from distillistic.data.loader import Batch, DataInfo
from distillistic.data.views import ViewMaker


def _images(b: int, c: int, s: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, s, s), generator=g, dtype=torch.uint8)


def test_equalize_matches_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    images = [
        _images(6, 3, 17, seed=1),  # random
        torch.full((2, 3, 9, 9), 77, dtype=torch.uint8),  # constant: left unchanged
        torch.where(torch.rand(3, 1, 12, 12, generator=g) < 0.3, 20, 200).to(torch.uint8),  # two levels
        torch.where(torch.rand(3, 1, 12, 12, generator=g) < 0.5, 0, 255).to(torch.uint8),
        (torch.rand(4, 1, 10, 10, generator=g) * 30 + 100).to(torch.uint8),  # a narrow range
        torch.cat([torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 255.0)], 2).to(torch.uint8),
    ]
    for batch in images:
        ours = equalize(batch)
        for img, out in zip(batch, ours):
            assert torch.equal(out, TF.equalize(img))


def _ops(aug: BatchRandAugment) -> list[str]:
    return [name for name, _, _ in aug.ops]


def test_the_operation_space_is_torchvisions() -> None:
    aug = BatchRandAugment((28, 28))
    space = RandAugment()._augmentation_space(31, (28, 28))
    assert _ops(aug) == list(space)
    for name, value, signed in aug.ops:
        magnitudes, tv_signed = space[name]
        assert signed == tv_signed
        assert value == (float(magnitudes[9].item()) if magnitudes.ndim > 0 else 0.0)


class _Forced(BatchRandAugment):
    """One slot with a fixed (operation, sign) for every sample."""

    def __init__(self, size: int, op: int, sign: int) -> None:
        super().__init__((size, size), num_ops=1)
        self.op, self.sign = op, sign

    def choices(self, keys: SampleKeys) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n = len(keys.index)
        return [(torch.full((n,), self.op), torch.full((n,), self.sign))]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("op", range(14))
def test_every_operation_matches_torchvision_per_image(op: int, channels: int) -> None:
    size = 20
    batch = _images(5, channels, size, seed=op)
    keys = SampleKeys(0, 0, torch.arange(5))
    for sign in (0, 1):
        aug = _Forced(size, op, sign)
        name, value, signed = aug.ops[op]
        magnitude = -value if signed and sign else value
        ours = aug(batch, keys)
        for img, out in zip(batch, ours):
            expected = _apply_op(img.unsqueeze(0), name, magnitude, InterpolationMode.NEAREST, None)[0]
            assert torch.equal(out, expected), (name, sign)
    assert torch.equal(batch, _images(5, channels, size, seed=op))  # the input is not modified


def test_keyed_randaugment_equals_a_per_image_loop() -> None:
    size, n = 16, 96
    batch = _images(n, 3, size, seed=5)
    keys = SampleKeys(11, 3, torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:n])
    aug = BatchRandAugment((size, size))
    ours = aug(batch, keys)
    chosen = aug.choices(keys)
    used = set()
    for i in range(n):
        img = batch[i : i + 1]
        for op_index, sign in chosen:
            name, value, signed = aug.ops[int(op_index[i])]
            used.add(name)
            img = _apply_op(img, name, -value if signed and int(sign[i]) else value, InterpolationMode.NEAREST, None)
        assert torch.equal(ours[i], img[0]), i
    assert len(used) == 14  # the batch exercised every operation


def test_a_view_regenerated_from_its_key_alone_is_bit_identical() -> None:
    size, n = 28, 64
    info = DataInfo("x", 10, 1, size, (0.3,), (0.25,), tuple("0123456789"), {}, "", None)
    views = ViewMaker(info, "randaugment", data_seed=9, device=torch.device("cpu"))
    images = _images(n, 1, size, seed=2)
    index = torch.randperm(5000, generator=torch.Generator().manual_seed(1))[:n]
    big = views(Batch(images, torch.zeros(n, dtype=torch.long), index, epoch=4), train=True).get(None, 1)
    for i in range(n):
        alone = views(Batch(images[i : i + 1], torch.zeros(1, dtype=torch.long), index[i : i + 1], epoch=4),
                      train=True).get(None, 1)
        assert torch.equal(alone[0], big[i])
    other_epoch = views(Batch(images, torch.zeros(n, dtype=torch.long), index, epoch=5), train=True).get(None, 1)
    assert sum(not torch.equal(a, b) for a, b in zip(big, other_epoch)) > n // 2
    # evaluation views are not augmented: only normalised
    plain = views(Batch(images, torch.zeros(n, dtype=torch.long), index, epoch=4), train=False).get(None, 1)
    assert torch.allclose(plain, (images.float() / 255 - 0.3) / 0.25)


@pytest.mark.parametrize(("seed", "epoch", "stream"), [(0, 0, 0), (42, 3, 1), (2**40 + 7, 2**33, 65), (123, 19, 91)])
def test_sample_hash_tensor_and_scalar_agree(seed: int, epoch: int, stream: int) -> None:
    index = torch.cat([torch.arange(2000), torch.tensor([2**31 - 1, 2**32 - 1, 2**32, 2**40 + 3])])
    hashes = sample_hash(seed, epoch, index, stream)
    assert hashes.dtype == torch.int64
    assert int(hashes.min()) >= 0
    assert int(hashes.max()) < 2**32
    assert hashes.tolist() == [sample_hash_int(seed, epoch, int(i), stream) for i in index]


def test_sample_hash_is_uniform_enough() -> None:
    h = sample_hash(1, 2, torch.arange(140_000), 3)
    counts = torch.bincount(h % 14, minlength=14).double()
    assert ((counts - 10_000).abs() / 10_000).max() < 0.05
    assert len(set(h.tolist())) > 139_990  # a near-bijection on indices
    assert not torch.equal(h, sample_hash(1, 2, torch.arange(140_000), 4))  # streams are independent


@pytest.mark.parametrize(("height", "width"), [(224, 224), (30, 41), (375, 500), (20, 300), (300, 20), (1, 1), (2, 9)])
def test_crop_box_is_inside_the_image_and_deterministic(height: int, width: int) -> None:
    shares = []
    for index in range(400):
        keys = (7, index % 3, index)
        top, left, h, w = crop_box(height, width, keys)
        assert (top, left, h, w) == crop_box(height, width, keys)
        assert 0 < h <= height
        assert 0 < w <= width
        assert 0 <= top <= height - h
        assert 0 <= left <= width - w
        shares.append(h * w / (height * width))
    if height == width == 224:
        assert min(shares) >= 0.07
        assert max(shares) <= 1.0
        assert 0.45 < sum(shares) / len(shares) < 0.6  # the mean of its distribution (~0.52)
    assert crop_box(224, 224, (7, 0, 1)) != crop_box(224, 224, (7, 1, 1))  # another epoch, another crop
