"""Writers of CIFAR files in the original format (Python 2 cPickle, protocol 2), shared by the CIFAR tests."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from pathlib import Path
from typing import Any

import numpy as np

from distillistic.data.cifar import CIFAR


def py2_pickle(obj: Any) -> bytes:
    """``obj`` as Python 2's cPickle wrote it at protocol 2 (bytes as BINSTRING, numpy 1's array globals)."""
    return b"\x80\x02" + _py2(obj) + b"."


def _py2(obj: Any) -> bytes:
    if obj is None:
        return b"N"
    if isinstance(obj, bool):
        return b"\x88" if obj else b"\x89"
    if isinstance(obj, int):
        return b"K" + bytes([obj]) if 0 <= obj < 256 else b"J" + struct.pack("<i", obj)
    if isinstance(obj, bytes):
        return b"U" + bytes([len(obj)]) + obj if len(obj) < 256 else b"T" + struct.pack("<i", len(obj)) + obj
    if isinstance(obj, tuple):
        return b"(" + b"".join(_py2(x) for x in obj) + b"t"
    if isinstance(obj, list):
        return b"](" + b"".join(_py2(x) for x in obj) + b"e"
    if isinstance(obj, dict):
        return b"}(" + b"".join(_py2(k) + _py2(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, np.ndarray):
        endian, name = obj.dtype.str[0].encode(), obj.dtype.str[1:].encode()
        dtype = b"cnumpy\ndtype\n" + _py2((name, 0, 1)) + b"R" + _py2((3, endian, None, None, None, -1, -1, 0)) + b"b"
        state = b"(" + _py2(1) + _py2(tuple(obj.shape)) + dtype + _py2(False) + _py2(obj.tobytes()) + b"t"
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _py2((0,)) + _py2(b"b") + b"\x87R"
                + state + b"b")
    raise TypeError(type(obj))


def write_cifar(root: Path, variant: str, per_class: int = 20, test_per_class: int = 4, seed: int = 0,
                noise: float = 40.0) -> Path:
    """A learnable CIFAR in the real format under ``root``: a random colour per class plus pixel noise
    (a class survives crops and flips).

    ``per_class`` training images per class (split evenly over the training batch files) and
    ``test_per_class`` test images per class; labels cycle over the classes. Returns ``root``.
    """
    spec = CIFAR[variant]
    rng = np.random.default_rng(seed)
    k = spec.num_classes
    templates = np.repeat(rng.uniform(30, 225, size=(k, 3)), 1024, axis=1)  # [K, 3072]: 3 flat planes
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)

    def rows(n_per_class: int) -> tuple[np.ndarray, list[int]]:
        labels = np.tile(np.arange(k), n_per_class)
        rng.shuffle(labels)
        data = templates[labels] + rng.normal(0, noise, size=(len(labels), 3072))
        return np.clip(np.round(data), 0, 255).astype(np.uint8), [int(y) for y in labels]

    train_x, train_y = rows(per_class)
    parts = np.array_split(np.arange(len(train_y)), len(spec.train))
    batches = [(name, train_x[p], [train_y[i] for i in p]) for name, p in zip(spec.train, parts)]
    batches.append((spec.test[0], *rows(test_per_class)))
    for name, data, labels in batches:
        entry: dict[bytes, Any] = {spec.labels_key.encode(): labels, b"data": data}
        (folder / name).write_bytes(py2_pickle(entry))
    meta = {spec.names_key.encode(): [f"class_{c}".encode() for c in range(k)]}
    (folder / spec.meta).write_bytes(py2_pickle(meta))
    trust(variant, folder)
    return root


def trust(variant: str, folder: Path) -> None:
    """Add the md5s of the files in ``folder`` to those ``ensure_cifar`` knows for ``variant`` (as the published
    ones are known): synthetic files then read as the originals do, and a changed byte is still refused."""
    spec = CIFAR[variant]
    mine = tuple((name, hashlib.md5((folder / name).read_bytes(), usedforsecurity=False).hexdigest())
                 for name in spec.files)
    CIFAR[variant] = dataclasses.replace(spec, file_md5=spec.file_md5 + mine)
