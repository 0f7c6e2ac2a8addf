"""Data integrity: Fashion-MNIST's md5 sums, the manifest's content hash of data folders, damaged files."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from bad_inputs import write_idx
from distillistic import cli
from distillistic.config import Config
from distillistic.data import datasets, integrity
from distillistic.data.datasets import ensure_files
from distillistic.data.integrity import check_image_bytes, folder_checksum, md5sum
from distillistic.errors import DataError


def _fashion_files(folder: Path, n_train: int = 30, n_test: int = 20) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28), np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))


def test_the_known_fashion_mnist_md5_sums_are_torchvisions() -> None:
    import torchvision

    assert dict(datasets.FASHION_FILES) == dict(torchvision.datasets.FashionMNIST.resources)


def test_fashion_mnist_files_are_checked_against_their_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "fashion"
    _fashion_files(folder)
    # with our files' own sums as "the known ones", they load ...
    monkeypatch.setattr(datasets, "FASHION_FILES", tuple((n, md5sum(folder / n)) for n, _ in datasets.FASHION_FILES))
    raw = datasets.DATASETS.get("fashion-mnist").load(Config(dataset="fashion-mnist"), folder)
    assert len(raw.splits["train"]) == 30
    assert len(raw.splits["test"]) == 20
    # ... and one changed byte is refused, naming the file
    path = folder / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[-9] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"'{path}' does not have the known md5"):
        datasets.DATASETS.get("fashion-mnist").load(Config(dataset="fashion-mnist"), folder)


def test_downloads_are_checked_and_a_bad_download_leaves_nothing(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    _fashion_files(mirror)
    files = [(n, md5sum(mirror / n)) for n, _ in datasets.FASHION_FILES]
    root = tmp_path / "data"
    paths = ensure_files(root, files, (mirror.as_uri() + "/",), "Fashion-MNIST")
    assert [md5sum(p) for p in paths] == [m for _, m in files]
    other = tmp_path / "other"
    wrong = [(files[0][0], "0" * 32), *files[1:]]
    with pytest.raises(DataError, match=r"could not be downloaded .*checksum mismatch"):
        ensure_files(other, wrong, (mirror.as_uri() + "/",), "Fashion-MNIST")
    assert not any(other.iterdir())  # no partial or unverified file left behind


def _images(root: Path, n: int = 6) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n // 2):
            p = root / c / f"{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (10, 10, 3), np.uint8)).save(p)
            paths.append(p)
    return paths


def test_folder_content_hash_covers_the_bytes_and_is_cached_by_path_size_mtime(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache = tmp_path / "imgs", tmp_path / "cache"
    paths = _images(root)
    read: list[Path] = []
    real = integrity._file_digest
    monkeypatch.setattr(integrity, "_file_digest", lambda p: read.append(p) or real(p))
    first = folder_checksum(root, paths, "content", cache)
    assert sorted(read) == sorted(paths)
    read.clear()
    assert folder_checksum(root, paths, "content", cache) == first
    assert read == []  # every digest came from the cache
    # same size, other bytes, new mtime: re-read that file only, and the hash changes
    data = bytearray(paths[2].read_bytes())
    data[len(data) // 2] ^= 0xFF
    paths[2].write_bytes(bytes(data))
    os.utime(paths[2], ns=(1, 10**18))
    changed = folder_checksum(root, paths, "content", cache)
    assert read == [paths[2]]
    assert changed != first
    assert folder_checksum(root, paths, "content", None) == changed  # the cache never changes the answer
    # a damaged cache is only a cache
    next(cache.iterdir()).write_text("{not json")
    assert folder_checksum(root, paths, "content", cache) == changed


def test_listing_mode_reads_no_file_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "imgs"
    paths = _images(root)
    monkeypatch.setattr(integrity, "_file_digest", lambda p: pytest.fail("listing mode read a file"))
    value = folder_checksum(root, paths, "listing")
    assert value.startswith("listing:")
    paths[0].write_bytes(paths[0].read_bytes() + b"\x00")  # a size change shows
    assert folder_checksum(root, paths, "listing") != value


def test_the_manifest_records_the_content_hash_of_an_image_folder(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    paths = _images(root, n=16)
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "imagefolder", "--data-root", str(root), "--image-size", "8", "--model",
                     "mlp", "--epochs", "1", "--batch-size", "4", "--num-workers", "0", "--device", "cpu",
                     "--split-fractions", "0.5,0.25,0.25", "--no-tensorboard", "--no-progress", "--out",
                     str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"]["checksum"] == folder_checksum(root, paths, "content")


def test_the_manifest_hash_of_idx_files_covers_their_content(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    folder.mkdir()
    rng = np.random.default_rng(0)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (40, 8, 8), np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", (np.arange(40) % 4).astype(np.uint8))
    first = integrity.file_checksum(datasets.read_idx_folder(folder).files)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", (np.arange(40) % 4)[::-1].astype(np.uint8))
    assert integrity.file_checksum(datasets.read_idx_folder(folder).files) != first


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is empty"),
    (b"\xff\xd8\xff\xe0" + bytes(300), "is truncated (its JPEG end marker is missing)"),
    (b"\x89PNG\r\n\x1a\n" + bytes(300), "is truncated (its PNG end chunk is missing)"),
    (b"GIF87a-no", "is not an image PIL can read"),
    (bytes(64), "is not an image PIL can read (UnidentifiedImageError)"),
])
def test_damaged_image_files_are_named(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "x.jpg"
    with pytest.raises(DataError, match=r"image file '.*x\.jpg' " + message.replace("(", r"\(").replace(")", r"\)")):
        check_image_bytes(path, content)


@pytest.mark.parametrize("keep", [10, 0.5, -8], ids=["header", "half", "no-trailer"])
def test_truncated_gzip_and_idx_files_are_named(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    write_idx(path, np.random.default_rng(0).integers(0, 255, (10, 8, 8), np.uint8))
    whole = path.read_bytes()
    cut = int(keep * len(whole)) if isinstance(keep, float) else keep
    path.write_bytes(whole[:cut])
    with pytest.raises(DataError, match=f"'{path}' is not a readable gzip file"):
        datasets.read_idx(path)
    raw = tmp_path / "t10k-images-idx3-ubyte"
    raw.write_bytes(gzip.decompress(whole)[:cut])
    with pytest.raises(DataError, match=f"'{raw}' is (truncated|not an IDX file)"):
        datasets.read_idx(raw)
