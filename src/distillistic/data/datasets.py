"""Dataset readers and the dataset registry.

Each registered dataset turns a config into a :class:`RawDataset`: its splits as sources of uint8
images (in memory for small datasets, file paths for image folders), class names, normalisation
statistics and the files it read (for the manifest's checksum). Splitting, sampling, loading and
augmentation are in :mod:`distillistic.data.loader`.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distillistic.config import Config, cache_dir
from distillistic.data.cifar import Variant as Cifar
from distillistic.data.cifar import cifar_spec, ensure_cifar, read_cifar
from distillistic.data.integrity import folder_checksum, md5sum
from distillistic.errors import ConfigError, DataError
from distillistic.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class TensorSource:
    """Images held in memory: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor) -> TensorSource:
        return TensorSource(self.images[index], self.labels[index])


@dataclass
class FileSource:
    """Images decoded from files on demand: ``paths[i]`` has label ``labels[i]``."""

    paths: list[str]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor) -> FileSource:
        return FileSource([self.paths[i] for i in index.tolist()], self.labels[index])


Source = TensorSource | FileSource


@dataclass
class RawDataset:
    """What a reader returns: ``splits`` holds ``train`` and ``test``, or a single ``all``."""

    splits: dict[str, Source]
    class_names: tuple[str, ...]
    mean: tuple[float, ...] | None = None  # None: computed from the training split
    std: tuple[float, ...] | None = None
    files: list[Path] = field(default_factory=list)
    checksum: str | None = None  # for data without files (bundled arrays, synthetic)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    load: Callable[[Config, Path], RawDataset]
    default_augment: str
    native_size: int | None = None  # None: from the config (image folders, synthetic)
    fallback_size: int = 224

    def default_image_size(self, cfg: Config) -> int:
        return self.native_size or self.fallback_size


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def dataset(name: str, augment: str, native_size: int | None = None,
            fallback_size: int = 224) -> Callable[[Callable[[Config, Path], RawDataset]],
                                                   Callable[[Config, Path], RawDataset]]:
    """Register a reader as dataset ``name`` with its default augmentation and image size."""

    def decorator(fn: Callable[[Config, Path], RawDataset]) -> Callable[[Config, Path], RawDataset]:
        DATASETS.add(name, DatasetSpec(name, fn, augment, native_size, fallback_size))
        return fn

    return decorator


def data_root(cfg: Config) -> Path:
    return Path(cfg.data_root).expanduser() if cfg.data_root else cache_dir(cfg) / "data" / cfg.dataset


# --- IDX (MNIST, Fashion-MNIST) ------------------------------------------------------------------------

_IDX_DTYPES: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_IMAGES = re.compile(r"^(?P<prefix>.+)-images[.-]idx3-ubyte(?P<gz>\.gz)?$")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (raw or gzip'd) into an array, with a clear error if damaged."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"'{path}' is not a readable gzip file ({e}); it is corrupt or truncated, "
                        "download it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"'{path}' is not an IDX file (bad magic number); replace it with the original file")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"'{path}' is truncated inside its header; download it again")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header < expected:
        raise DataError(f"'{path}' is truncated: its header promises {expected} bytes of data but it holds "
                        f"{len(data) - header}; download it again")
    return np.frombuffer(data, dtype=dtype, count=int(np.prod(dims)), offset=header).reshape(dims)


def _idx_pair(images_path: Path) -> TensorSource:
    m = _IDX_IMAGES.match(images_path.name)
    assert m is not None
    stem = m.group("prefix")
    candidates = [images_path.with_name(f"{stem}-labels{sep}idx1-ubyte{gz}")
                  for sep in ("-", ".") for gz in (".gz", "")]
    labels_path = next((p for p in candidates if p.is_file()), None)
    if labels_path is None:
        raise DataError(f"'{images_path}' has no labels file beside it; expected '{stem}-labels-idx1-ubyte[.gz]'")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if labels.dtype.kind not in "iu":
        raise DataError(f"'{labels_path}' holds {labels.dtype} labels; labels are whole class indices (IDX type "
                        "0x08 unsigned byte, or a wider integer)")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"'{images_path}' (shape {'x'.join(map(str, images.shape))}) and '{labels_path}' (shape "
                        f"{'x'.join(map(str, labels.shape))}) do not match: expected N images of H x W and N labels")
    tensor = torch.from_numpy(images.astype(np.uint8, copy=True)).unsqueeze(1)
    return TensorSource(tensor, torch.from_numpy(labels.astype(np.int64)))


def _split_name(prefix: str) -> str:
    prefix = prefix.lower()
    if prefix.startswith(("train",)):
        return "train"
    if prefix.startswith(("t10k", "test", "val")):
        return "test"
    return prefix


def read_idx_folder(root: Path) -> RawDataset:
    """All ``*-images-idx3-ubyte[.gz]`` files of a folder (or its torchvision ``*/raw`` subfolder)."""
    if not root.is_dir():
        raise DataError(f"data folder '{root}' does not exist; pass --data-root pointing at the IDX files")
    folders = [root, *sorted(p for p in root.glob("*/raw") if p.is_dir())]
    for folder in folders:
        images = sorted(p for p in folder.iterdir() if _IDX_IMAGES.match(p.name))
        # Prefer the gzip'd copy when a file is there both ways.
        chosen: dict[str, Path] = {}
        for p in images:
            prefix = _IDX_IMAGES.match(p.name).group("prefix")  # type: ignore[union-attr]
            if prefix not in chosen or p.suffix == ".gz":
                chosen[prefix] = p
        if chosen:
            break
    else:
        raise DataError(f"no IDX files in '{root}': expected '<split>-images-idx3-ubyte[.gz]' with "
                        "'<split>-labels-idx1-ubyte[.gz]' beside it")
    splits: dict[str, Source] = {}
    files: list[Path] = []
    for prefix, path in sorted(chosen.items()):
        splits[_split_name(prefix)] = _idx_pair(path)
        files += [path, *[q for q in path.parent.iterdir() if q.name.startswith(f"{prefix}-labels")]]
    if set(splits) != {"train", "test"}:
        splits = {"all": _concat([s for s in splits.values() if isinstance(s, TensorSource)])}
    classes = _check_labels(splits, root)
    return RawDataset(splits, tuple(str(c) for c in range(classes)), files=sorted(files))


def _check_labels(splits: Mapping[str, TensorSource | FileSource], root: Path) -> int:
    """The class count of IDX labels, which must be whole numbers 0..K-1, each class with a sample: a stray
    label (a negative one, or 200 among ten digits) would otherwise grow the model silently."""
    labels = torch.cat([s.labels for s in splits.values()])
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise DataError(f"the IDX labels in '{root}' include {low}: labels are class indices >= 0; fix the labels file")
    present = torch.bincount(labels, minlength=high + 1)
    missing = (present == 0).nonzero().flatten().tolist()
    if missing:
        raise DataError(f"the IDX labels in '{root}' run up to {high} but class {missing[0]} has no sample"
                        f"{f' (nor {len(missing) - 1} more)' if len(missing) > 1 else ''}: a label outside the "
                        "classes; fix the labels file")
    return high + 1


def _concat(sources: Sequence[TensorSource]) -> TensorSource:
    return TensorSource(torch.cat([s.images for s in sources]), torch.cat([s.labels for s in sources]))


@dataset("mnist", "randaugment", native_size=28)
def _mnist(cfg: Config, root: Path) -> RawDataset:
    return read_idx_folder(root)


SHIPPED_MNIST = Path(__file__).resolve().parent / "mnist_t10k"  # CC BY-SA 3.0: see its README.md


@dataset("mnist-t10k", "randaugment", native_size=28)
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
    return RawDataset({"train": _idx_pair(paths[0]), "test": _idx_pair(paths[2])}, FASHION_CLASSES,
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


@dataset("digits", "none", native_size=8)
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


@dataset("synthetic", "none", fallback_size=16)
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
