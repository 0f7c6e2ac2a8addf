"""Helpers shared by the tests: IDX writers, CLI runner, directory snapshots, tiny configs, the run's temp root."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from distillistic import Config

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``: magic ``00 00 <dtype> <ndim>``, big-endian dims, big-endian data."""
    code = IDX_CODES[array.dtype]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file, gzip'd when ``path`` ends in ``.gz``."""
    data = idx_bytes(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def class_images(labels: np.ndarray, size: int = 8, seed: int = 0) -> np.ndarray:
    """uint8 images ``[N, size, size]`` whose brightness encodes the label (so a model can learn them)."""
    rng = np.random.default_rng(seed)
    base = (labels.astype(np.float64) * 20 + 30)[:, None, None]
    noise = rng.normal(0, 5, size=(len(labels), size, size))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_idx_split(folder: Path, prefix: str, labels: np.ndarray, gz: bool = True, size: int = 8,
                    seed: int = 0) -> tuple[Path, Path]:
    """``<prefix>-images-idx3-ubyte[.gz]`` and ``<prefix>-labels-idx1-ubyte[.gz]`` for ``labels``."""
    ext = ".gz" if gz else ""
    images = write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", class_images(labels, size, seed))
    labels_path = write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels.astype(np.uint8))
    return images, labels_path


def balanced_labels(per_class: int, classes: int = 10, seed: int = 0) -> np.ndarray:
    """``per_class`` samples of each of ``classes`` classes, shuffled."""
    labels = np.repeat(np.arange(classes), per_class)
    return np.random.default_rng(seed).permutation(labels).astype(np.uint8)


def session_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary folder of the whole test run: under xdist, the one that holds every worker's folder."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: relative path -> (sha256 of its bytes, mtime in ns)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny(out: Path | str | None = None, **overrides: Any) -> Config:
    """A config that trains in about a second on the CPU: ``cnn`` on ``digits``, one epoch."""
    base: dict[str, Any] = dict(dataset="digits", model="cnn", epochs=1, batch_size=64, lr=3e-3, progress=False,
                                tensorboard=False, num_workers=0)
    if out is not None:
        base["out"] = str(out)
    return Config(**(base | overrides))


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[str]]:
    """Run ``distillistic`` in-process: (exit code, stdout, non-empty stderr lines)."""
    from distillistic.cli import main

    capsys.readouterr()  # drop anything captured before
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse exits on unknown flags
        rc = int(e.code) if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return rc, captured.out, [line for line in captured.err.splitlines() if line.strip()]


class LocalMirror:
    """A local HTTP server on 127.0.0.1 over ``folder`` that counts the requests it answers (download tests)."""

    def __init__(self, folder: Path) -> None:
        self.requests: list[str] = []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                mirror.requests.append(self.path)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                      functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
