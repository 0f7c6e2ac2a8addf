"""CIFAR as a dataset: the keyed crop-and-flip augmentation, the registered readers, a tiny epoch on real-format
files, and the step-decay / Nesterov schedule of the published protocols."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from _cifar_files import write_cifar
from _util import tiny
from distillistic.config import Config, load
from distillistic.data.augment import SampleKeys
from distillistic.data.cifar import CIFAR10_MEAN, CIFAR100_STD
from distillistic.data.crop_flip import BatchCropFlip
from distillistic.data.loader import build_data
from distillistic.errors import ConfigError
from distillistic.training import setup
from distillistic.training.optim import make_optimizer, make_scheduler
from distillistic.training.run import train


def test_crop_flip_is_torchvisions_crop_and_flip_per_sample() -> None:
    """Each sample equals torchvision's pad -> crop at (dy, dx) -> hflip, done one image at a time."""
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8)
    keys = SampleKeys(7, 3, torch.arange(100, 164))
    aug = BatchCropFlip(padding=4)
    out = aug(img, keys)
    dy, dx, flip = aug.params(keys)
    for i in range(len(img)):
        ref = TF.crop(TF.pad(img[i], [4, 4, 4, 4], fill=0), int(dy[i]), int(dx[i]), 32, 32)
        if flip[i]:
            ref = TF.horizontal_flip(ref)
        assert torch.equal(out[i], ref), i
    # Every offset and both flips occur; offsets stay within [0, 8].
    assert set(dy.tolist()) == set(range(9))
    assert set(flip.tolist()) == {False, True}
    # A sample's view depends on its key only, not on its batch.
    assert torch.equal(aug(img[10:20], SampleKeys(7, 3, keys.index[10:20])), out[10:20])
    assert not torch.equal(aug(img, SampleKeys(7, 4, keys.index)), out)  # another epoch, other views


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar_datasets_read_the_real_format(tmp_path: Path, variant: str) -> None:
    root = write_cifar(tmp_path / variant, variant, per_class=5, test_per_class=2)
    cfg = setup.resolve(tiny(dataset=variant, data_root=str(root)))
    assert (cfg.augment, cfg.image_size) == ("cifar", 32)
    bundle = build_data(cfg)
    k = 10 if variant == "cifar10" else 100
    assert bundle.info.num_classes == k
    assert bundle.info.channels == 3
    assert bundle.info.sizes == {"train": 5 * k - round(5 * k * 0.1), "val": round(5 * k * 0.1), "test": 2 * k}
    if variant == "cifar10":
        assert bundle.info.mean == CIFAR10_MEAN
    else:
        assert bundle.info.std == CIFAR100_STD


@pytest.mark.e2e
def test_one_tiny_cifar_epoch_learns(tmp_path: Path) -> None:
    """resnet8 on a learnable CIFAR-10 in the real format, with the crop-flip augmentation, 2 short epochs."""
    root = write_cifar(tmp_path / "c10", "cifar10", per_class=24, test_per_class=10, noise=30)
    result = train(tiny(tmp_path / "run", dataset="cifar10", data_root=str(root), model="resnet8", epochs=2,
                        batch_size=32, optimizer="sgd", lr=0.05, scheduler="multistep", milestones=(1,),
                        nesterov=True, warmup_fraction=0.0))
    assert result.config.augment == "cifar"
    top1 = result.summary["models"]["student"]["test"]["top1"]
    assert top1 > 0.5, top1  # chance is 0.1
    rows = [json.loads(x) for x in (result.out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if r.get("split") == "train" and "lr" in r]
    if lrs:  # the logged learning rate drops by gamma after the milestone
        assert lrs[-1] == pytest.approx(0.005, rel=1e-6)
    else:
        assert any(r.get("lr") == pytest.approx(0.005, rel=1e-6) for r in rows), rows


def test_multistep_decays_at_the_milestone_epochs() -> None:
    cfg = Config(optimizer="sgd", lr=0.05, scheduler="multistep", milestones=(2, 4), gamma=0.1, epochs=5,
                 warmup_fraction=0.0, nesterov=True, weight_decay=5e-4)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer(cfg, [p])
    assert opt.param_groups[0]["nesterov"]
    assert opt.param_groups[0]["weight_decay"] == 5e-4
    sched = make_scheduler(cfg, opt, total_steps=50)  # 10 steps per epoch
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:20] == [0.05] * 20
    assert lrs[20:40] == pytest.approx([0.005] * 20)
    assert lrs[40:] == pytest.approx([0.0005] * 10)


@pytest.mark.parametrize(("overrides", "key"), [
    ({"scheduler": "multistep"}, "milestones"),
    ({"milestones": "150,180"}, "milestones"),
    ({"scheduler": "multistep", "milestones": "180,150"}, "milestones"),
    ({"nesterov": True}, "nesterov"),
    ({"gamma": 0}, "gamma"),
])
def test_bad_schedule_settings_name_the_key(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load(None, overrides)


def test_in_memory_splits_move_to_a_gpu_only() -> None:
    from distillistic.data.datasets import TensorSource
    from distillistic.data.loader import EpochSampler, Loader, resident

    src = TensorSource(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8), torch.arange(40) % 4)
    assert resident(src, torch.device("cpu")) is src  # the CPU path is unchanged
    if not torch.cuda.is_available():
        pytest.skip("no GPU: the device-resident path is checked where one is present")
    gpu = resident(src, torch.device("cuda"))
    assert gpu.images.device.type == "cuda"  # type: ignore[union-attr]
    sampler = EpochSampler(src.labels, 8, 0, True)
    host = list(Loader(src, sampler, 8, True, 0, 0, pin_memory=True).epoch(1))
    dev = list(Loader(gpu, sampler, 8, True, 0, 0, pin_memory=True).epoch(1))
    for a, b in zip(host, dev):
        assert b.images.device.type == "cuda"
        assert torch.equal(a.images, b.images.cpu())
        assert torch.equal(a.labels, b.labels.cpu())
        assert torch.equal(a.index, b.index)
