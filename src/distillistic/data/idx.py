"""The IDX format of MNIST and Fashion-MNIST (LeCun et al.): files, image/label pairs and folders of them."""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillistic.data.sources import FileSource, RawDataset, Source, TensorSource
from distillistic.errors import DataError

__all__ = ["idx_pair", "read_idx", "read_idx_folder"]

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


def idx_pair(images_path: Path) -> TensorSource:
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
        splits[_split_name(prefix)] = idx_pair(path)
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
