"""Dataset readers and the dataset registry.

Each registered dataset turns a config into a :class:`RawDataset`: its splits as sources of uint8
images (in memory for small datasets, file paths for image folders), class names, normalisation
statistics and the files it read (for the manifest's checksum). The types are in
:mod:`distillistic.data.sources` and the IDX reader in :mod:`distillistic.data.idx` (both re-exported here).
Splitting, sampling, loading and augmentation are in :mod:`distillistic.data.loader`.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distillistic.config import Config, cache_dir
from distillistic.data.cifar import Variant as Cifar
from distillistic.data.cifar import cifar_spec, ensure_cifar, read_cifar
from distillistic.data.idx import idx_pair, read_idx, read_idx_folder
from distillistic.data.integrity import folder_checksum, md5sum
from distillistic.data.sources import FileSource, RawDataset, Source, TensorSource
from distillistic.errors import ConfigError, DataError
from distillistic.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["DATASETS", "FASHION_CLASSES", "FASHION_FILES", "FASHION_MIRRORS", "IMAGENET_MEAN", "IMAGENET_STD",
           "DatasetSpec", "FileSource", "RawDataset", "Source", "TensorSource", "data_root", "dataset", "download",
           "ensure_files", "read_idx", "read_idx_folder"]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    load: Callable[[Config, Path], RawDataset]
    default_augment: str
    native_size: int | None = None  # None: from the config (image folders, synthetic)
    fallback_size: int = 224
    no_root: str | None = None  # why --data-root is not read (where the images come from), None if it is

    def default_image_size(self, cfg: Config) -> int:
        return self.native_size or self.fallback_size


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def dataset(name: str, augment: str, native_size: int | None = None, fallback_size: int = 224,
            no_root: str | None = None) -> Callable[[Callable[[Config, Path], RawDataset]],
                                                    Callable[[Config, Path], RawDataset]]:
    """Register a reader as dataset ``name`` with its default augmentation and image size; ``no_root``: why
    it reads no ``--data-root`` (where its images come from), for a dataset that reads none."""

    def decorator(fn: Callable[[Config, Path], RawDataset]) -> Callable[[Config, Path], RawDataset]:
        DATASETS.add(name, DatasetSpec(name, fn, augment, native_size, fallback_size, no_root))
        return fn

    return decorator


def data_root(cfg: Config) -> Path:
    return Path(cfg.data_root).expanduser() if cfg.data_root else cache_dir(cfg) / "data" / cfg.dataset


@dataset("mnist", "randaugment", native_size=28)
def _mnist(cfg: Config, root: Path) -> RawDataset:
    return read_idx_folder(root)


SHIPPED_MNIST = Path(__file__).resolve().parent / "mnist_t10k"  # CC BY-SA 3.0: see its README.md


@dataset("mnist-t10k", "randaugment", native_size=28, no_root="its digits are shipped in the package")
def _mnist_t10k(cfg: Config, root: Path) -> RawDataset:
    """The official MNIST test set shipped in the package (10,000 digits; LeCun, Cortes, Burges; CC BY-SA 3.0),
    carved 0.7/0.1/0.2 into train/val/test: real data offline, the demo's dataset."""
    return read_idx_folder(SHIPPED_MNIST)


# --- Fashion-MNIST -------------------------------------------------------------------------------------

FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
FASHION_FILES = (
    ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
)
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


def download(url: str, dest: Path, md5: str | None, timeout: float = 15.0) -> None:
    """Download ``url`` to ``dest`` through a temporary file; check its md5; raise ``OSError`` on failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, tmp.open("wb") as f:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                f.write(chunk)
        if md5 is not None and md5sum(tmp) != md5:
            raise OSError(f"checksum mismatch for {url}")
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_files(root: Path, files: Sequence[tuple[str, str]], mirrors: Sequence[str], what: str) -> list[Path]:
    """Make sure ``files`` (name, md5) are in ``root``: check present ones, download missing ones."""
    paths = []
    for name, md5 in files:
        path = root / name
        raw = root / name.removesuffix(".gz")
        if raw.is_file() and not path.is_file():
            paths.append(raw)  # an already extracted copy: its structure is checked when read
            continue
        if path.is_file():
            if md5sum(path) != md5:
                raise DataError(f"'{path}' does not have the known md5 {md5} of {what}'s {name}; it is damaged "
                                "or a different file: delete it to download it again")
            paths.append(path)
            continue
        errors = []
        for mirror in mirrors:
            try:
                download(mirror + name, path, md5)
                break
            except (OSError, urllib.error.URLError) as e:
                errors.append(f"{mirror}: {e}")
        else:
            names = ", ".join(n for n, _ in files)
            raise DataError(f"{what} is not in '{root}' and could not be downloaded ({errors[-1]}); put the four "
                            f"files {names} in '{root}'")
        paths.append(path)
    return paths


@dataset("fashion-mnist", "randaugment", native_size=28)
def _fashion_mnist(cfg: Config, root: Path) -> RawDataset:
    sub = root / "FashionMNIST" / "raw"  # torchvision's layout, if the user already has it
    folder = sub if not (root / FASHION_FILES[0][0]).exists() and sub.is_dir() else root
    paths = ensure_files(folder, FASHION_FILES, FASHION_MIRRORS, "Fashion-MNIST")
    return RawDataset({"train": idx_pair(paths[0]), "test": idx_pair(paths[2])}, FASHION_CLASSES,
                      mean=(0.2860,), std=(0.3530,), files=paths)


# --- CIFAR-10 / CIFAR-100 (the safe reader of distillistic.data.cifar) --------------------------------


def _cifar(variant: Cifar) -> Callable[[Config, Path], RawDataset]:
    def load(cfg: Config, root: Path) -> RawDataset:
        if cfg.data_root and not root.exists():  # a mistyped --data-root is never created (by a download)
            raise DataError(f"data folder '{root}' does not exist; check the path, or create it to download "
                            f"{cifar_spec(variant).title} into it")
        folder = ensure_cifar(root, variant)
        spec = cifar_spec(variant)
        train_x, train_y, names = read_cifar(folder, variant, train=True)
        test_x, test_y, _ = read_cifar(folder, variant, train=False)
        splits: dict[str, Source] = {
            "train": TensorSource(torch.from_numpy(train_x), torch.from_numpy(train_y.astype(np.int64))),
            "test": TensorSource(torch.from_numpy(test_x), torch.from_numpy(test_y.astype(np.int64)))}
        return RawDataset(splits, tuple(names), mean=spec.mean, std=spec.std,
                          files=sorted(folder / name for name in spec.files))

    load.__doc__ = f"{variant}: torchvision's python archive, read without unpickling code (data/cifar.py)."
    return load


for _variant in ("cifar10", "cifar100"):
    dataset(_variant, "cifar", native_size=32)(_cifar(_variant))


# --- scikit-learn digits -------------------------------------------------------------------------------


@dataset("digits", "none", native_size=8, no_root="scikit-learn's bundled copy")
def _digits(cfg: Config, root: Path) -> RawDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    tensor = torch.from_numpy(images).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    checksum = hashlib.sha256(images.tobytes() + bunch.target.astype(np.int64).tobytes()).hexdigest()
    return RawDataset({"all": TensorSource(tensor, labels)}, tuple(str(c) for c in range(10)), checksum=checksum)


# --- synthetic -----------------------------------------------------------------------------------------


SYNTHETIC_VALUES = 2**29  # the generator's float noise is 4 bytes a value: 2 GiB at most


@dataset("synthetic", "none", fallback_size=16, no_root="its images are generated in memory")
def _synthetic(cfg: Config, root: Path) -> RawDataset:
    """Seeded images: a random template per class plus noise, so that a model can learn them."""
    g = torch.Generator().manual_seed(cfg.split_seed)
    k, n, c, s = cfg.synthetic_classes, cfg.synthetic_samples, cfg.synthetic_channels, cfg.image_size or 16
    if k > n:
        raise ConfigError("synthetic_classes", k, f"at most --synthetic-samples ({n}): every class needs a sample")
    if n * c * s * s > SYNTHETIC_VALUES:
        raise ConfigError("synthetic_samples", n, f"at most {SYNTHETIC_VALUES:,d} pixel values in all (samples x "
                                                  f"channels x size², here {n * c * s * s:,d}); lower "
                                                  "--synthetic-samples or --image-size")
    templates = torch.rand(k, c, s, s, generator=g) * 255
    labels = torch.arange(n) % k
    labels = labels[torch.randperm(n, generator=g)]
    noise = torch.randn(n, c, s, s, generator=g) * 60
    images = (templates[labels] + noise).clamp(0, 255).round().to(torch.uint8)
    checksum = hashlib.sha256(f"synthetic:{n}:{k}:{c}:{s}:{cfg.split_seed}".encode()).hexdigest()
    return RawDataset({"all": TensorSource(images, labels)}, tuple(str(i) for i in range(k)), checksum=checksum)


# --- ImageNet-style folders ----------------------------------------------------------------------------


def _list_images(folder: Path, classes: Sequence[str]) -> FileSource:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        for p in sorted(class_dir.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS:
                paths.append(str(p))
                labels.append(label)
    return FileSource(paths, torch.tensor(labels, dtype=torch.int64))


def _select_classes(cfg: Config, found: list[str], root: Path) -> list[str]:
    if cfg.class_names:
        missing = [c for c in cfg.class_names if c not in found]
        if missing:
            raise DataError(f"classes {missing} are not folders of '{root}'; choose among its {len(found)} "
                            f"class folders (e.g. {', '.join(found[:5])})")
        return list(cfg.class_names)
    return found[: cfg.max_classes] if cfg.max_classes else found


@dataset("imagefolder", "randaugment", fallback_size=224)
def _imagefolder(cfg: Config, root: Path) -> RawDataset:
    """``root/train/<class>/*`` and ``root/val/<class>/*``, or class folders directly in ``root``."""
    if not root.is_dir():
        raise DataError(f"data folder '{root}' does not exist; pass --data-root with train/ and val/ class folders")
    has_splits = (root / "train").is_dir()
    base = root / "train" if has_splits else root
    found = sorted(p.name for p in base.iterdir() if p.is_dir())
    classes = _select_classes(cfg, found, base)
    if has_splits:
        test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
        if test_dir is None:
            raise DataError(f"'{root}' has train/ but no val/ (or test/) folder; add it or point --data-root at "
                            "a folder of class folders to carve splits from it")
        splits: dict[str, Source] = {"train": _list_images(root / "train", classes),
                                     "test": _list_images(test_dir, classes)}
    else:
        splits = {"all": _list_images(root, classes)}
    for name, src in splits.items():
        if len(src) == 0:
            raise DataError(f"no images in the class folders of '{root}' ({name} split); expected files such as "
                            "<class>/<name>.JPEG")
    first = splits.get("train", splits.get("all"))
    seen = set(first.labels.tolist()) if first is not None else set()
    empty = [c for i, c in enumerate(classes) if i not in seen]
    if empty:  # a class the model would have an output for but never see
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise DataError(f"class folder '{base / empty[0]}' holds no images{more}; add images, remove the folder, or "
                        "choose the classes with --class-names")
    files = [Path(p) for src in splits.values() for p in src.paths]  # type: ignore[union-attr]
    checksum = folder_checksum(root, files, cfg.data_hash, cache_dir(cfg) / "hashes")
    return RawDataset(splits, tuple(classes), mean=IMAGENET_MEAN, std=IMAGENET_STD, checksum=checksum)
