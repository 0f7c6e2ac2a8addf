"""Dataset readers and splits on files the tests make themselves (IDX, JPEG folders, a local HTTP mirror)."""

from __future__ import annotations

import gzip
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from _util import LocalMirror, balanced_labels, class_images, idx_bytes, md5, write_idx, write_idx_split
from distillistic.config import Config
from distillistic.data import datasets
from distillistic.data.datasets import FileSource, TensorSource, read_idx
from distillistic.data.loader import DataBundle, EpochSampler, Loader, build_data, stratified_split
from distillistic.errors import DataError
from distillistic.training import setup


def build(**overrides: Any) -> DataBundle:
    return build_data(setup.resolve(Config(**overrides)))


def class_counts(labels: torch.Tensor, k: int = 10) -> list[int]:
    return torch.bincount(labels, minlength=k).tolist()


# --- IDX -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_round_trips_every_dtype(tmp_path: Path, suffix: str, dtype: Any) -> None:
    array = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype)
    path = write_idx(tmp_path / f"x-images-idx3-ubyte{suffix}", array)
    back = read_idx(path)
    assert back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("gz", [False, True])
def test_one_split_folder_is_carved_070_010_020_exactly_and_stratified(tmp_path: Path, gz: bool) -> None:
    # 20 samples of each of 10 classes; every image carries its sample index in two pixels, so the splits
    # can be checked for overlap.
    labels = balanced_labels(20)
    images = class_images(labels, size=28)
    index = np.arange(len(labels))
    images[:, 0, 0], images[:, 0, 1] = index // 256, index % 256
    ext = ".gz" if gz else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{ext}", images)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{ext}", labels)
    bundle = build(dataset="mnist", data_root=str(tmp_path))
    assert bundle.info.sizes == {"train": 140, "val": 20, "test": 40}
    ids = {}
    for name, per_class in (("train", 14), ("val", 2), ("test", 4)):
        src = bundle.splits[name]
        assert isinstance(src, TensorSource)
        assert src.images.shape[1:] == (1, 28, 28)
        assert src.images.dtype == torch.uint8
        assert class_counts(src.labels) == [per_class] * 10
        sample = src.images[:, 0, 0, 0].long() * 256 + src.images[:, 0, 0, 1].long()
        ids[name] = set(sample.tolist())
        # each image still sits with its own label
        np.testing.assert_array_equal(src.labels.numpy(), labels[sample.numpy()])
    assert not ids["train"] & ids["val"]
    assert not ids["train"] & ids["test"]
    assert not ids["val"] & ids["test"]
    assert ids["train"] | ids["val"] | ids["test"] == set(range(200))
    assert bundle.info.num_classes == 10
    assert bundle.info.channels == 1
    assert bundle.info.image_size == 28


def test_the_carving_is_seeded() -> None:
    labels = torch.from_numpy(balanced_labels(20)).long()
    a = stratified_split(labels, [140, 20, 40], seed=0)
    b = stratified_split(labels, [140, 20, 40], seed=0)
    c = stratified_split(labels, [140, 20, 40], seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_train_and_t10k_folder_carves_val_from_train(tmp_path: Path) -> None:
    write_idx_split(tmp_path, "train", balanced_labels(10), gz=True, size=28, seed=1)
    write_idx_split(tmp_path, "t10k", balanced_labels(3), gz=False, size=28, seed=2)
    bundle = build(dataset="mnist", data_root=str(tmp_path))
    assert bundle.info.sizes == {"train": 90, "val": 10, "test": 30}
    assert class_counts(bundle.splits["train"].labels) == [9] * 10
    assert class_counts(bundle.splits["val"].labels) == [1] * 10
    # the test split is t10k exactly, in its order
    test = bundle.splits["test"]
    assert isinstance(test, TensorSource)
    np.testing.assert_array_equal(test.labels.numpy(), balanced_labels(3))
    np.testing.assert_array_equal(test.images[:, 0].numpy(), class_images(balanced_labels(3), 28, 2))


def test_torchvision_raw_subfolder_and_gz_preferred(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_idx_split(raw, "train", balanced_labels(10), gz=True, size=28)
    write_idx_split(raw, "t10k", balanced_labels(2), gz=True, size=28)
    # a damaged extracted copy beside the .gz must be ignored: the gzip'd file is preferred
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"junk")
    bundle = build(dataset="mnist", data_root=str(tmp_path))
    assert bundle.info.sizes["test"] == 20


def test_corrupt_gzip(tmp_path: Path) -> None:
    write_idx_split(tmp_path, "t10k", balanced_labels(2))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz.*not a readable gzip file"):
        build(dataset="mnist", data_root=str(tmp_path))


def test_truncated_gzip(tmp_path: Path) -> None:
    images, _ = write_idx_split(tmp_path, "t10k", balanced_labels(2))
    data = images.read_bytes()
    images.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        build(dataset="mnist", data_root=str(tmp_path))


def test_truncated_idx_data(tmp_path: Path) -> None:
    images, _ = write_idx_split(tmp_path, "t10k", balanced_labels(2), gz=False)
    data = images.read_bytes()
    images.write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"truncated: its header promises 1280 bytes of data but it holds 1270"):
        build(dataset="mnist", data_root=str(tmp_path))


def test_truncated_idx_header(tmp_path: Path) -> None:
    images, _ = write_idx_split(tmp_path, "t10k", balanced_labels(2), gz=False)
    images.write_bytes(images.read_bytes()[:9])
    with pytest.raises(DataError, match="truncated inside its header"):
        build(dataset="mnist", data_root=str(tmp_path))


def test_bad_magic_number(tmp_path: Path) -> None:
    images, _ = write_idx_split(tmp_path, "t10k", balanced_labels(2), gz=True)
    good = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(b"\x08\x03" + good[2:]))
    with pytest.raises(DataError, match="bad magic number"):
        build(dataset="mnist", data_root=str(tmp_path))


def test_images_without_labels_file(tmp_path: Path) -> None:
    _, labels = write_idx_split(tmp_path, "t10k", balanced_labels(2))
    labels.unlink()
    with pytest.raises(DataError, match="no labels file beside it"):
        build(dataset="mnist", data_root=str(tmp_path))


def test_images_and_labels_of_different_lengths(tmp_path: Path) -> None:
    write_idx_split(tmp_path, "t10k", balanced_labels(2))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", balanced_labels(2)[:-1])
    with pytest.raises(DataError, match="do not match"):
        build(dataset="mnist", data_root=str(tmp_path))


def test_folder_without_idx_files(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match="no IDX files in"):
        build(dataset="mnist", data_root=str(tmp_path))


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data folder '.*nowhere' does not exist"):
        build(dataset="mnist", data_root=str(tmp_path / "nowhere"))


# --- image folders -------------------------------------------------------------------------------------

CLASSES = ("cat", "dog", "fox")


def write_jpegs(folder: Path, per_class: int, classes: tuple[str, ...] = CLASSES, size: tuple[int, int] = (41, 30),
                seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 60 * label, 20, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{name}_{i}.JPEG", quality=90)


def test_imagefolder_with_train_and_val(tmp_path: Path) -> None:
    write_jpegs(tmp_path / "train", 10)
    write_jpegs(tmp_path / "val", 2, seed=1)
    bundle = build(dataset="imagefolder", data_root=str(tmp_path), image_size=16)
    assert bundle.info.class_names == CLASSES
    assert bundle.info.num_classes == 3
    assert bundle.info.channels == 3
    assert bundle.info.sizes == {"train": 27, "val": 3, "test": 6}
    assert class_counts(bundle.splits["val"].labels, 3) == [1, 1, 1]
    test = bundle.splits["test"]
    assert isinstance(test, FileSource)
    for path, label in zip(test.paths, test.labels.tolist()):
        assert Path(path).parent.name == CLASSES[label]
        assert Path(path).parent.parent.name == "val"
    train = bundle.splits["train"]
    assert isinstance(train, FileSource)
    assert all(Path(p).parent.parent.name == "train" for p in train.paths)


def test_flat_imagefolder_is_carved(tmp_path: Path) -> None:
    write_jpegs(tmp_path, 10)
    bundle = build(dataset="imagefolder", data_root=str(tmp_path), image_size=16)
    assert bundle.info.sizes == {"train": 21, "val": 3, "test": 6}
    assert class_counts(bundle.splits["test"].labels, 3) == [2, 2, 2]
    seen = [p for s in bundle.splits.values() for p in s.paths]  # type: ignore[union-attr]
    assert len(seen) == len(set(seen)) == 30


def test_imagefolder_class_subset_by_names(tmp_path: Path) -> None:
    write_jpegs(tmp_path / "train", 10)
    write_jpegs(tmp_path / "val", 2)
    bundle = build(dataset="imagefolder", data_root=str(tmp_path), image_size=16, class_names=("fox", "dog"))
    assert bundle.info.class_names == ("fox", "dog")
    for src in bundle.splits.values():
        assert isinstance(src, FileSource)
        assert {Path(p).parent.name for p, y in zip(src.paths, src.labels.tolist()) if y == 0} == {"fox"}
        assert {Path(p).parent.name for p, y in zip(src.paths, src.labels.tolist()) if y == 1} == {"dog"}
    with pytest.raises(DataError, match=r"classes \['wolf'\] are not folders"):
        build(dataset="imagefolder", data_root=str(tmp_path), image_size=16, class_names=("wolf",))


def test_imagefolder_first_k_classes(tmp_path: Path) -> None:
    write_jpegs(tmp_path, 10)
    bundle = build(dataset="imagefolder", data_root=str(tmp_path), image_size=16, max_classes=2)
    assert bundle.info.class_names == ("cat", "dog")
    assert sum(bundle.info.sizes.values()) == 20


def test_imagefolder_with_empty_class_folders(tmp_path: Path) -> None:
    for name in CLASSES:
        (tmp_path / name).mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images in the class folders"):
        build(dataset="imagefolder", data_root=str(tmp_path), image_size=16)


def test_imagefolder_train_without_val(tmp_path: Path) -> None:
    write_jpegs(tmp_path / "train", 3)
    with pytest.raises(DataError, match=r"has train/ but no val/"):
        build(dataset="imagefolder", data_root=str(tmp_path), image_size=16)


def _loader(src: FileSource, train: bool, size: int = 16) -> Loader:
    return Loader(src, EpochSampler(src.labels, 4, data_seed=3, shuffle=train), size, train, data_seed=3, workers=0)


def test_imagefolder_decoding_is_keyed_and_eval_matches_torchvision(tmp_path: Path) -> None:
    from torchvision import transforms as T
    from torchvision.transforms.functional import pil_to_tensor

    write_jpegs(tmp_path, 4, size=(41, 30))
    src = datasets._imagefolder(Config(dataset="imagefolder"), tmp_path).splits["all"]
    assert isinstance(src, FileSource)
    train = _loader(src, train=True)
    first = [(b.images.clone(), b.index.clone()) for b in train.epoch(0)]
    again = [(b.images.clone(), b.index.clone()) for b in _loader(src, train=True).epoch(0)]
    other = [(b.images.clone(), b.index.clone()) for b in train.epoch(1)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert first[0][0].shape == (4, 3, 16, 16)
    assert first[0][0].dtype == torch.uint8
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))  # epochs draw other crops
    # evaluation: Resize(16 * 256 / 224) + CenterCrop(16), exactly torchvision's transform
    reference = T.Compose([T.Resize(round(16 * 256 / 224)), T.CenterCrop(16)])
    for batch in _loader(src, train=False).epoch(0):
        for img, i in zip(batch.images, batch.index.tolist()):
            with Image.open(src.paths[i]) as f:
                expected = pil_to_tensor(reference(f.convert("RGB")))
            assert torch.equal(img, expected)


def test_corrupt_jpeg_error_names_the_file(tmp_path: Path) -> None:
    write_jpegs(tmp_path, 2)
    bad = tmp_path / "dog" / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    # (the default content hash refuses this file up front; "listing" leaves it to the decoder, tested here)
    src = datasets._imagefolder(Config(dataset="imagefolder", data_hash="listing"), tmp_path).splits["all"]
    assert isinstance(src, FileSource)
    with pytest.raises(DataError, match=r"broken\.JPEG' cannot be decoded"):
        for _ in _loader(src, train=False).epoch(0):
            pass


# --- fashion-mnist through a local HTTP mirror -----------------------------------------------------------




Mirrored = tuple[LocalMirror, list[str]]  # the mirror and the file names it serves


@pytest.fixture
def fashion_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Mirrored]:
    """Generated Fashion-MNIST-shaped files served over HTTP; FASHION_FILES/MIRRORS point at them."""
    served = tmp_path / "served"
    files = []
    for prefix, per_class in (("train", 6), ("t10k", 2)):
        write_idx_split(served, prefix, balanced_labels(per_class), gz=True, size=28)
        files += [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"]
    mirror = LocalMirror(served)
    monkeypatch.setattr(datasets, "FASHION_FILES", tuple((n, md5((served / n).read_bytes())) for n in files))
    monkeypatch.setattr(datasets, "FASHION_MIRRORS", (mirror.url,))
    yield mirror, files
    mirror.close()


def test_fashion_mnist_downloads_checks_and_reuses(tmp_path: Path, fashion_mirror: Mirrored) -> None:
    mirror, files = fashion_mirror
    root = tmp_path / "fm"
    bundle = build(dataset="fashion-mnist", data_root=str(root))
    assert sorted(mirror.requests) == sorted(f"/{n}" for n in files)
    assert sorted(p.name for p in root.iterdir()) == sorted(files)  # no .part files left behind
    for name, expected in datasets.FASHION_FILES:
        assert md5((root / name).read_bytes()) == expected
    assert bundle.info.sizes == {"train": 54, "val": 6, "test": 20}
    assert bundle.info.class_names == datasets.FASHION_CLASSES
    assert bundle.info.mean == (0.2860,)
    assert bundle.info.std == (0.3530,)
    assert bundle.info.image_size == 28
    assert bundle.info.channels == 1
    # a second run finds the files and downloads nothing
    again = build(dataset="fashion-mnist", data_root=str(root))
    assert len(mirror.requests) == 4
    assert again.info.checksum == bundle.info.checksum


def test_fashion_mnist_download_with_wrong_md5(tmp_path: Path, fashion_mirror: Mirrored,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    files = list(datasets.FASHION_FILES)
    files[2] = (files[2][0], "0" * 32)
    monkeypatch.setattr(datasets, "FASHION_FILES", tuple(files))
    root = tmp_path / "fm"
    with pytest.raises(DataError, match=r"checksum mismatch for http://127\.0\.0\.1:\d+/t10k-images-idx3-ubyte\.gz"):
        build(dataset="fashion-mnist", data_root=str(root))
    assert not (root / files[2][0]).exists()
    assert not list(root.glob("*.part"))


def test_fashion_mnist_present_file_with_wrong_md5(tmp_path: Path, fashion_mirror: Mirrored) -> None:
    mirror, files = fashion_mirror
    root = tmp_path / "fm"
    root.mkdir()
    (root / files[0]).write_bytes(gzip.compress(idx_bytes(np.zeros((3, 28, 28), np.uint8))))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz' does not have the known md5"):
        build(dataset="fashion-mnist", data_root=str(root))
    assert mirror.requests == []  # a damaged file is reported, not silently replaced


def test_fashion_mnist_offline_names_the_four_files_and_the_folder(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nobody listens on: the mirror is unreachable
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(datasets, "FASHION_MIRRORS", (f"http://127.0.0.1:{port}/",))
    root = tmp_path / "fm"
    with pytest.raises(DataError) as info:
        build(dataset="fashion-mnist", data_root=str(root))
    message = str(info.value)
    assert "could not be downloaded" in message
    assert f"'{root}'" in message
    for name, _ in datasets.FASHION_FILES:
        assert name in message
    assert "\n" not in message


def test_download_writes_through_a_temporary_file(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    payload = bytes(range(256)) * 100
    (served / "blob.bin").write_bytes(payload)
    mirror = LocalMirror(served)
    try:
        dest = tmp_path / "dl" / "blob.bin"
        datasets.download(mirror.url + "blob.bin", dest, md5(payload))
        assert dest.read_bytes() == payload
        with pytest.raises(OSError, match="checksum mismatch"):
            datasets.download(mirror.url + "blob.bin", tmp_path / "dl" / "other.bin", "f" * 32)
        assert sorted(p.name for p in dest.parent.iterdir()) == ["blob.bin"]
    finally:
        mirror.close()


# --- digits, synthetic, real MNIST ----------------------------------------------------------------------


def test_digits() -> None:
    bundle = build(dataset="digits")
    assert bundle.info.sizes == {"train": 1259, "val": 179, "test": 359}  # 1797 carved 0.7 / 0.1 / 0.2
    assert bundle.info.num_classes == 10
    assert bundle.info.channels == 1
    assert bundle.info.image_size == 8
    whole = torch.bincount(torch.cat([s.labels for s in bundle.splits.values()]), minlength=10)
    for name, share in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        counts = torch.bincount(bundle.splits[name].labels, minlength=10)
        assert (counts - share * whole).abs().max() <= 2  # stratified: each class in proportion
    train = bundle.splits["train"]
    assert isinstance(train, TensorSource)
    assert train.images.dtype == torch.uint8
    assert int(train.images.max()) == 255
    assert bundle.info.checksum == build(dataset="digits").info.checksum


def test_synthetic_has_the_asked_shape_and_is_seeded() -> None:
    kw: dict[str, Any] = dict(dataset="synthetic", synthetic_samples=100, synthetic_classes=5, synthetic_channels=3,
                              image_size=12)
    a, b = build(**kw), build(**kw)
    assert a.info.sizes == {"train": 70, "val": 10, "test": 20}
    assert a.info.num_classes == 5
    assert a.info.channels == 3
    assert a.info.image_size == 12
    for name in ("train", "val", "test"):
        src_a, src_b = a.splits[name], b.splits[name]
        assert isinstance(src_a, TensorSource)
        assert isinstance(src_b, TensorSource)
        assert src_a.images.shape[1:] == (3, 12, 12)
        assert torch.equal(src_a.images, src_b.images)
        assert torch.equal(src_a.labels, src_b.labels)
    assert class_counts(a.splits["train"].labels, 5) == [14] * 5
    c = build(**kw, split_seed=1)
    assert not torch.equal(c.splits["train"].images, a.splits["train"].images)  # type: ignore[union-attr]


def test_mnist_t10k_is_carved_7000_1000_2000(mnist_t10k: Path) -> None:
    bundle = build(dataset="mnist", data_root=str(mnist_t10k))
    assert bundle.info.sizes == {"train": 7000, "val": 1000, "test": 2000}
    assert bundle.info.num_classes == 10
    assert bundle.info.image_size == 28
    whole = torch.bincount(torch.cat([s.labels for s in bundle.splits.values()]), minlength=10)
    assert int(whole.sum()) == 10000
    for name, share in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        counts = torch.bincount(bundle.splits[name].labels, minlength=10)
        assert (counts - share * whole).abs().max() <= 2


# --- sampling ------------------------------------------------------------------------------------------


def test_epoch_sampler_is_a_pure_function_of_seed_and_epoch() -> None:
    labels = torch.from_numpy(balanced_labels(10)).long()
    sampler = EpochSampler(labels, batch_size=32, data_seed=5, shuffle=True)
    assert len(sampler) == 3  # 100 // 32: the ragged batch is dropped
    order = sampler.order(0)
    assert sorted(order.tolist()) == list(range(100))
    assert torch.equal(order, EpochSampler(labels, 32, 5, True).order(0))
    assert not torch.equal(order, sampler.order(1))
    assert not torch.equal(order, EpochSampler(labels, 32, 6, True).order(0))
    batches = list(sampler.batches(0))
    assert [len(b) for b in batches] == [32, 32, 32]
    assert torch.equal(torch.cat(batches), order[:96])
    assert torch.equal(torch.cat(list(sampler.batches(0, start_step=1))), order[32:96])  # from any step
    evaluation = EpochSampler(labels, 32, 5, shuffle=False)
    assert len(evaluation) == 4
    assert torch.equal(torch.cat(list(evaluation.batches(0))), torch.arange(100))  # every sample, in order


def test_imbalanced_sampler_draws_one_class_with_the_given_share() -> None:
    labels = torch.from_numpy(balanced_labels(1000)).long()
    sampler = EpochSampler(labels, 100, data_seed=0, shuffle=True, imbalance=(3, 0.9))
    drawn = labels[sampler.order(0)]
    assert len(drawn) == 10_000
    assert abs(float((drawn == 3).float().mean()) - 0.9) < 0.02
    others = torch.bincount(drawn[drawn != 3], minlength=10)
    assert int(others[3]) == 0
    assert int(others.sum()) > 700
