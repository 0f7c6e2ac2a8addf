"""Data integrity: checksums of the files a run reads, and cheap checks that name a damaged file.

* :func:`md5sum` checks downloads and known files (Fashion-MNIST's published sums).
* :func:`file_checksum` (small datasets: IDX files) hashes every byte, every run.
* :func:`folder_checksum` (image folders) hashes every file's content once and caches each file's
  digest by (path, size, mtime), so later runs only ``stat`` unchanged files; reading a file the
  first time also checks it (:func:`check_image_bytes`). ``data_hash=listing`` hashes names and sizes
  only and says so in the result (``listing:`` prefix).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from distillistic.errors import DataError


def md5sum(path: Path) -> str:
    """The md5 of a file, read in 1 MiB chunks (only to compare with published sums, not for security)."""
    h = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_image_bytes(path: Path, data: bytes) -> None:
    """Refuse an empty file, a JPEG or PNG without its end marker (a truncated download or copy) and a
    file whose header PIL cannot identify.

    Only these cheap checks run here (the pixels are not decoded); any other damage is reported, with
    the file's name, when the image is decoded during training.
    """
    if not data:
        raise DataError(f"image file '{path}' is empty; remove or replace it")
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-1024:]:
        raise DataError(f"image file '{path}' is truncated (its JPEG end marker is missing); remove or replace it")
    if data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-64:]:
        raise DataError(f"image file '{path}' is truncated (its PNG end chunk is missing); remove or replace it")
    from PIL import Image, UnidentifiedImageError

    try:  # reads the header only: the format, the size and the mode
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height, mode = *image.size, image.mode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"image file '{path}' declares more than {Image.MAX_IMAGE_PIXELS} pixels (a decompression "
                        "bomb, or an image far too large to train on); remove it or resize it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"image file '{path}' is not an image PIL can read ({type(e).__name__}); remove or replace "
                        "it") from None
    if mode in WIDE_MODES:
        raise DataError(f"image file '{path}' has {WIDE_MODES[mode]} pixels (PIL mode {mode}), which 8-bit training "
                        f"would clip; convert it to 8-bit ({width} x {height}) first")


# Pixel modes beyond 8 bits per channel: converting them to RGB clips every value above 255.
WIDE_MODES = {"I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I;16N": "16-bit", "I": "32-bit integer",
              "F": "32-bit float"}


def _file_digest(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"data file '{path}' cannot be read ({e.strerror}); check it") from None
    check_image_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _cache_hit(entry: Any, size: int, mtime: int) -> bool:
    return isinstance(entry, list) and len(entry) == 3 and entry[:2] == [size, mtime] and isinstance(entry[2], str)


def folder_checksum(root: Path, paths: Sequence[Path], mode: str, cache: Path | None = None) -> str:
    """The manifest's checksum of a folder of files.

    ``mode="content"``: sha256 over every file's relative path, size and sha256 of its bytes. Per-file
    digests are cached in ``cache`` keyed by (path, size, mtime), so only new or changed files are
    read again; reading a file for the first time also checks it (:func:`check_image_bytes`).
    ``mode="listing"``: sha256 over relative paths and sizes only (no file is read); the result is
    prefixed ``listing:`` so the manifest says what it covers.
    """
    from distillistic.fileio import atomic_write_json

    entries: list[tuple[str, str, int, int]] = []
    for p in sorted(paths):
        try:
            st = p.stat()
        except OSError as e:
            raise DataError(f"data file '{p}' cannot be read ({e.strerror}); check it") from None
        rel = str(p.relative_to(root)) if p.is_relative_to(root) else str(p)
        entries.append((os.path.abspath(p), rel, st.st_size, st.st_mtime_ns))
    h = hashlib.sha256()
    if mode == "listing":
        for _, rel, size, _ in entries:
            h.update(f"{rel}\t{size}\n".encode())
        return "listing:" + h.hexdigest()
    cache_file = cache / f"{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]}.json" if cache else None
    known: dict[str, Any] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            known = dict(json.loads(cache_file.read_text()))
        except (OSError, ValueError, TypeError):
            known = {}  # a damaged cache is only a cache: hash again
    todo = [e for e in entries if not _cache_hit(known.get(e[0]), e[2], e[3])]
    if len(todo) >= 1000:
        logging.getLogger("distillistic").info("hashing %d files of %s (once; cached by path, size and mtime)",
                                               len(todo), root)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
        for (key, _, size, mtime), digest in zip(todo, pool.map(lambda e: _file_digest(Path(e[0])), todo)):
            known[key] = [size, mtime, digest]
    for key, rel, size, _ in entries:
        h.update(f"{rel}\t{size}\t{known[key][2]}\n".encode())
    if todo and cache_file is not None:
        with contextlib.suppress(OSError):  # an unwritable cache costs time on the next run, nothing else
            atomic_write_json(cache_file, known)
    return h.hexdigest()


def file_checksum(paths: Sequence[Path]) -> str:
    """sha256 over the names and contents of ``paths`` (the data a run read)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
