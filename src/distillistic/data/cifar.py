"""CIFAR-10 and CIFAR-100 in torchvision's "python version" format, read without running pickled code.

The archives ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` (Krizhevsky, "Learning Multiple Layers
of Features from Tiny Images", 2009; https://www.cs.toronto.edu/~kriz/cifar.html) extract to
``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and ``cifar-100-python/{train, test, meta}``.
Each file is a Python 2 pickle (protocol 2) of a dict: ``data`` uint8 ``[N, 3072]`` (per row 1024 red, 1024
green, 1024 blue values, each plane row-major 32 x 32), ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100)
a list of N ints, and the class names in the meta file (``label_names`` / ``fine_label_names``).

``pickle.load`` on such a file runs whatever the file asks for, so a tampered file could run any code. Here
:class:`_SafeUnpickler` resolves only the globals needed to rebuild a numpy array (numpy's ``_reconstruct``,
``ndarray``, ``dtype``) plus the two helpers Python 3 itself writes for ``bytes`` at protocol 2; every other
global is refused before anything is called, and the result is checked for the expected keys, shapes, dtypes
and label ranges.

Integration note: this module imports only numpy, the standard library and :mod:`distillistic.errors`, and has
its own small download function (the same scheme as ``datasets.download``: a ``.part`` file, md5 checked
before it is renamed into place).
"""

from __future__ import annotations

import hashlib
import importlib
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

import numpy as np

from distillistic.errors import DataError, short_repr

Variant = Literal["cifar10", "cifar100"]

CIFAR_MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)

# Per-channel mean and std of pixel / 255 over the 50,000 training images (population std over all pixels
# of a channel, not the mean of per-image stds that gives the often-copied (0.2023, 0.1994, 0.2010)).
# CIFAR-10: MadryLab/robustness#70, akamaster/pytorch_resnet_cifar10#9 (mean 0.49139968 0.48215841
# 0.44653091, std 0.24703223 0.24348513 0.26158784). CIFAR-100: weiaicunzai/pytorch-cifar100
# conf/global_settings.py (mean 0.50707516 0.48654887 0.44091784, std 0.26733429 0.25643846 0.27615047).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

PIXELS = 3 * 32 * 32
_MAX_EXTRACTED = 1 << 30  # the archives hold ~180 MB; more is not a CIFAR archive (and could fill the disk)


@dataclass(frozen=True)
class CifarSpec:
    """Where a variant lives and what its files hold (names, md5s and URL as in torchvision's ``cifar.py``)."""

    title: str
    archive: str
    md5: str  # of the archive
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    labels_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    file_md5: tuple[tuple[str, str], ...]  # (name, md5) of the extracted files; ensure_cifar checks them

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train, *self.test, self.meta)


CIFAR: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        "CIFAR-10", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta", "labels", "label_names",
        10, CIFAR10_MEAN, CIFAR10_STD,
        (("data_batch_1", "c99cafc152244af753f735de768cd75f"), ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
         ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"), ("data_batch_4", "634d18415352ddfa80567beed471001a"),
         ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"), ("test_batch", "40351d587109b95175f43aff81a1287e"),
         ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"))),
    "cifar100": CifarSpec(
        "CIFAR-100", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python",
        ("train",), ("test",), "meta", "fine_labels", "fine_label_names", 100, CIFAR100_MEAN, CIFAR100_STD,
        (("train", "16019d7e3df5f24257cddd939b257f8d"), ("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),
         ("meta", "7973b15100ade9c7d40fb424638fde48"))),
}


def cifar_spec(variant: str) -> CifarSpec:
    if variant not in CIFAR:
        raise ValueError(f"unknown CIFAR variant {variant!r}; expected one of {sorted(CIFAR)}")
    return CIFAR[variant]


# --- the restricted unpickler --------------------------------------------------------------------------


class _Refused(pickle.UnpicklingError):
    """The pickle asked for something outside the allow-list; nothing of it was called."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(what)


def _latin1_encode(text: object, encoding: object = "latin1") -> bytes:
    """What ``_codecs.encode`` does for the ``bytes`` Python 3 writes at protocol 2, and nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode with a {type(text).__name__} and encoding {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args: object) -> bytes:
    """``bytes()``: how Python 3 writes ``b''`` at protocol 2 (``bytes(n)`` would allocate n bytes: refused)."""
    if args:
        raise _Refused("builtins.bytes with arguments")
    return b""


def _numpy_reconstruct() -> Callable[..., Any]:
    # numpy >= 2 keeps it in numpy._core; reading it through the old numpy.core name would warn.
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            reconstruct: Callable[..., Any] = importlib.import_module(module)._reconstruct
            return reconstruct
        except (ImportError, AttributeError):
            continue
    raise ImportError("numpy has no multiarray._reconstruct")  # pragma: no cover - every numpy has it


def _empty_array(cls: object, shape: object, dtype: object) -> Any:
    """numpy's ``_reconstruct`` as its own pickles call it: an empty ndarray that ``__setstate__`` then fills from
    the file's bytes. Any other shape would allocate an uninitialised (or oversized) array: refused."""
    if cls is not np.ndarray or shape != (0,):
        raise _Refused(f"numpy._reconstruct of {short_repr(shape)}")
    return _numpy_reconstruct()(cls, shape, dtype)


def _plain_dtype(spec: object, align: object = False, copy: object = True) -> np.dtype[Any]:
    """``numpy.dtype`` for whole numbers and bytes only (the originals' arrays): objects or records refused."""
    dtype = np.dtype(spec)  # type: ignore[call-overload]
    if dtype.kind not in "uiSb" or dtype.fields is not None:
        raise _Refused(f"numpy arrays of dtype {short_repr(str(dtype))}")
    return dtype


_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _empty_array,  # written by numpy 1 (the originals)
    ("numpy._core.multiarray", "_reconstruct"): _empty_array,  # written by numpy 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only :data:`_ALLOWED`; any other global or persistent id raises before it is called."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent id")


def load_pickle(path: Path, spec: CifarSpec) -> dict[str, Any]:
    """Unpickle one CIFAR file through :class:`_SafeUnpickler`; keys are returned as ``str``.

    ``encoding="latin1"`` (as torchvision does) turns the originals' Python 2 strings into ``str`` and is
    what numpy needs to rebuild their arrays; keys written as ``bytes`` (b'data') are decoded the same way.
    """
    try:
        with path.open("rb") as f:
            obj = _SafeUnpickler(f, encoding="latin1").load()
    except _Refused as e:
        raise DataError(f"'{path}' asks to load {e.what}, which no {spec.title} file holds; it was refused "
                        f"without running anything: replace it with the file from {spec.archive}") from None
    except OSError as e:
        raise DataError(f"'{path}' cannot be read ({e})") from None
    except Exception as e:  # damaged pickles fail in many ways (EOF, bad opcode, numpy's state check)
        raise DataError(f"'{path}' is not a readable {spec.title} pickle ({type(e).__name__}: {e}); it is "
                        f"corrupt or truncated: replace it with the file from {spec.archive}") from None
    if not isinstance(obj, dict):
        raise DataError(f"'{path}' holds a {type(obj).__name__}, not the dict of a {spec.title} file")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(key, bytes):
            key = key.decode("latin1")
        if not isinstance(key, str):
            raise DataError(f"'{path}' has a key of type {type(key).__name__}; a {spec.title} file has text keys")
        out[key] = value
    return out


# --- reading -------------------------------------------------------------------------------------------


def _field(d: dict[str, Any], key: str, path: Path) -> Any:
    if key not in d:
        raise DataError(f"'{path}' has no '{key}' entry (it has {sorted(d)}); it is not a CIFAR file of this kind")
    return d[key]


def _batch(path: Path, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: ``data`` uint8 ``[N, 3072]`` and labels int64 ``[N]`` in ``[0, num_classes)``."""
    d = load_pickle(path, spec)
    data = _field(d, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        what = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"'{path}': 'data' is {what}; a {spec.title} batch holds uint8 [N, {PIXELS}]")
    raw = _field(d, spec.labels_key, path)
    if not isinstance(raw, list | np.ndarray):
        raise DataError(f"'{path}': '{spec.labels_key}' is a {type(raw).__name__}, not a list of ints")
    labels = np.zeros(0, np.int64) if isinstance(raw, list) and not raw else np.asarray(raw)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"'{path}': '{spec.labels_key}' holds {labels.dtype} values of shape {list(labels.shape)}; "
                        "expected a flat list of ints")
    if len(labels) != len(data):
        raise DataError(f"'{path}' has {len(data)} images but {len(labels)} labels")
    bad = (labels < 0) | (labels >= spec.num_classes)
    if bad.any():
        raise DataError(f"'{path}': label {int(labels[bad][0])} at index {int(np.argmax(bad))} is outside "
                        f"[0, {spec.num_classes}) for {spec.title}")
    return data, labels.astype(np.int64)


def _class_names(path: Path, spec: CifarSpec) -> list[str]:
    names = _field(load_pickle(path, spec), spec.names_key, path)
    if not isinstance(names, list) or len(names) != spec.num_classes \
            or not all(isinstance(n, str | bytes) for n in names):
        raise DataError(f"'{path}': '{spec.names_key}' is not a list of {spec.num_classes} names")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def _missing(folder: Path, spec: CifarSpec) -> list[str]:
    return [name for name in spec.files if not (folder / name).is_file()]


def find_cifar(root: Path, spec: CifarSpec) -> Path | None:
    """``root/<folder>`` or ``root`` itself when it holds every extracted file; ``None`` when neither does."""
    for folder in (root / spec.folder, root):
        if folder.is_dir() and not _missing(folder, spec):
            return folder
    return None


def read_cifar(root: Path, variant: Variant, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a split of the extracted CIFAR files in ``root`` (or in ``root/cifar-10-batches-py`` etc.).

    Returns images uint8 ``[N, 3, 32, 32]`` (channels first, RGB, as :class:`datasets.TensorSource` holds
    them; torchvision's ``.data`` is the same transposed to ``[N, 32, 32, 3]``), labels int64 ``[N]`` (the
    fine labels for CIFAR-100) and the class names. The training split concatenates the batches in order.
    """
    spec = cifar_spec(variant)
    folder = find_cifar(root, spec)
    if folder is None:
        where = root / spec.folder if (root / spec.folder).is_dir() else root
        missing = _missing(where, spec) if where.is_dir() else list(spec.files)
        raise DataError(f"{spec.title} is not in '{where}' (missing {', '.join(missing)}); extract {spec.archive} "
                        f"into '{root}' or let ensure_cifar download it")
    batches = [_batch(folder / name, spec) for name in (spec.train if train else spec.test)]
    images = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([b[1] for b in batches])
    return images, labels, _class_names(folder / spec.meta, spec)


# --- download and extraction ---------------------------------------------------------------------------


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)  # compared with published sums only
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_file(url: str, dest: Path, md5: str, timeout: float = 30.0) -> None:
    """Download ``url`` to ``dest`` through ``dest.part``; check its md5 first; raise ``OSError`` on failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    h = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, tmp.open("wb") as f:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                f.write(chunk)
                h.update(chunk)
        if h.hexdigest() != md5:
            raise OSError(f"checksum mismatch for {url}: md5 {h.hexdigest()}, expected {md5}")
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def _unsafe(member: tarfile.TarInfo) -> str | None:
    """Why extracting ``member`` could write outside the target folder (or is not a plain file), or ``None``."""
    name = member.name
    if member.issym() or member.islnk():
        return f"is a link to '{member.linkname}'"
    if not (member.isfile() or member.isdir()):
        return "is not a regular file or folder"
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive:
        return "has an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "has '..' in its path"
    return None


def extract_cifar(archive: Path, root: Path, spec: CifarSpec) -> Path:
    """Extract ``spec.folder`` from ``archive`` into ``root``; refuse the archive if any member is unsafe.

    Members go to a temporary folder in ``root`` first and the finished folder is renamed into place, so an
    interrupted extraction never leaves a folder that looks complete.
    """
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                why = _unsafe(m)
                if why is not None:
                    raise DataError(f"'{archive}' is refused: its member '{m.name}' {why}; a {spec.title} archive "
                                    f"holds only the files of {spec.folder}/")
            if sum(m.size for m in members) > _MAX_EXTRACTED:
                raise DataError(f"'{archive}' would extract to more than {_MAX_EXTRACTED >> 20} MiB; "
                                f"it is not a {spec.title} archive")
            wanted = [m for m in members if PurePosixPath(m.name).parts[:1] == (spec.folder,)]
            tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
            try:
                # filter="data" (Python >= 3.11.4) repeats the checks above inside tarfile itself.
                kwargs: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=wanted, **kwargs)
                if find_cifar(tmp / spec.folder, spec) is None:
                    raise DataError(f"'{archive}' does not hold {', '.join(_missing(tmp / spec.folder, spec))} "
                                    f"in {spec.folder}/; it is not a {spec.title} archive")
                (tmp / spec.folder).replace(root / spec.folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise DataError(f"'{archive}' is not a readable .tar.gz ({e}); delete it to download it again") from None
    return root / spec.folder


def ensure_cifar(root: Path, variant: Variant, mirrors: Sequence[str] = CIFAR_MIRRORS) -> Path:
    """The folder of extracted CIFAR files: found in ``root``, else extracted from ``root/<archive>``, else
    downloaded from the first mirror that answers (``mirror + archive name``) with the archive's md5 checked.

    A present archive with another md5, or an incomplete extracted folder, is reported, not replaced.
    """
    spec = cifar_spec(variant)
    found = find_cifar(root, spec)
    if found is not None:
        return check_extracted(found, spec)
    if (root / spec.folder).exists():
        raise DataError(f"'{root / spec.folder}' is incomplete (missing "
                        f"{', '.join(_missing(root / spec.folder, spec))}); delete it to extract or download again")
    archive = root / spec.archive
    if archive.is_file():
        if _md5(archive) != spec.md5:
            raise DataError(f"'{archive}' does not have the known md5 {spec.md5} of {spec.title}; it is damaged "
                            "or a different file: delete it to download it again")
    else:
        errors = []
        for mirror in mirrors:
            try:
                download_file(mirror + spec.archive, archive, spec.md5)
                break
            except OSError as e:  # urllib's URLError and HTTPError are OSErrors
                errors.append(f"{mirror}: {e}")
        else:
            raise DataError(f"{spec.title} is not in '{root}' and could not be downloaded "
                            f"({errors[-1] if errors else 'no mirrors given'}); put {spec.archive} or its extracted "
                            f"folder {spec.folder}/ in '{root}'")
    return check_extracted(extract_cifar(archive, root, spec), spec)


def check_extracted(folder: Path, spec: CifarSpec) -> Path:
    """``folder``, once every extracted file has a known md5 (a damaged or other file is refused by name)."""
    for name in spec.files:
        known = [md5 for n, md5 in spec.file_md5 if n == name]
        if known and _md5(folder / name) not in known:
            raise DataError(f"'{folder / name}' does not have the known md5 {known[0]} of {spec.title}'s {name}; it "
                            f"is damaged or a different file: delete '{folder}' to extract or download it again")
    return folder
