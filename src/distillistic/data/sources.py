"""What a dataset reader returns: its splits as sources of uint8 images (in memory or file paths), class names,
normalisation statistics and the files it read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

__all__ = ["FileSource", "RawDataset", "Source", "TensorSource"]


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
