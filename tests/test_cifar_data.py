"""CIFAR-10/100 reader on files the tests write in the original format; tampered pickles and archives are refused.

The originals were written by Python 2's cPickle at protocol 2 with numpy 1: byte strings as SHORT_BINSTRING /
BINSTRING opcodes and arrays through ``numpy.core.multiarray._reconstruct``. Python 3 cannot write that (its
``bytes`` go through ``_codecs.encode``), so :func:`py2_pickle` emits those opcodes by hand; files written by
Python 3's ``pickle.dump(protocol=2)`` with bytes or str keys are read too. torchvision's own CIFAR classes
(which call ``pickle.load`` directly) are the reference for what the files hold.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import socket
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from hashlib import md5 as _md5
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _cifar_files import py2_pickle
from _util import LocalMirror
from distillistic.data import cifar as cifar_data
from distillistic.data.cifar import CIFAR, ensure_cifar, read_cifar
from distillistic.errors import DataError

# --- writers of the original format ---------------------------------------------------------------------


def py3_bytes_keys(obj: dict[bytes, Any]) -> bytes:
    return pickle.dumps(obj, protocol=2)


def py3_str_keys(obj: dict[bytes, Any]) -> bytes:
    """A file as Python 3 would make it natively: every byte string (keys, names) as ``str``."""

    def text(x: Any) -> Any:
        return x.decode() if isinstance(x, bytes) else [text(y) for y in x] if isinstance(x, list) else x

    return pickle.dumps({k.decode(): text(v) for k, v in obj.items()}, protocol=2)


WRITERS: dict[str, Callable[[dict[bytes, Any]], bytes]] = {
    "py2": py2_pickle, "py3-bytes-keys": py3_bytes_keys, "py3-str-keys": py3_str_keys}


def make_cifar(root: Path, variant: str, write: Callable[[dict[bytes, Any]], bytes] = py2_pickle,
               seed: int = 0) -> dict[str, Any]:
    """Write ``root/<folder>/...`` with a few random images per file; return what was written."""
    spec = CIFAR[variant]
    rng = np.random.default_rng(seed)
    folder = root / spec.folder
    folder.mkdir(parents=True)
    written: dict[str, Any] = {}
    for i, name in enumerate(spec.files[:-1]):
        n = 3 + i  # batches of different sizes: the concatenation order shows
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, spec.num_classes, size=n)]
        labels[0] = spec.num_classes - 1  # the largest label is allowed
        entry: dict[bytes, Any] = {b"batch_label": f"batch {i}".encode(), spec.labels_key.encode(): labels,
                                   b"data": data, b"filenames": [f"img_{i}_{j}.png".encode() for j in range(n)]}
        if variant == "cifar100":
            entry[b"coarse_labels"] = [y // 5 for y in labels]
        (folder / name).write_bytes(write(entry))
        written[name] = (data, labels)
    names = [f"class_{k}".encode() for k in range(spec.num_classes)]
    meta: dict[bytes, Any] = {spec.names_key.encode(): names}
    meta.update({b"num_cases_per_batch": 10000, b"num_vis": 3072} if variant == "cifar10"
                else {b"coarse_label_names": [f"super_{k}".encode() for k in range(20)]})
    (folder / spec.meta).write_bytes(write(meta))
    written["classes"] = [n.decode() for n in names]
    return written


def expected_split(written: dict[str, Any], variant: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 3, 32, 32]`` built pixel by pixel from the rows: (n, c, y, x) = row[c * 1024 + y * 32 + x]."""
    spec = CIFAR[variant]
    rows = [r for name in (spec.train if train else spec.test) for r in written[name][0]]
    labels = [y for name in (spec.train if train else spec.test) for y in written[name][1]]
    images = np.zeros((len(rows), 3, 32, 32), np.uint8)
    for n, row in enumerate(rows):
        for c in range(3):
            for y in range(32):
                for x in range(32):
                    images[n, c, y, x] = row[c * 1024 + y * 32 + x]
    return images, np.array(labels, np.int64)


# --- reading ------------------------------------------------------------------------------------------


def test_the_py2_writer_emits_what_python2_wrote() -> None:
    data = py2_pickle({b"data": np.zeros((1, 3072), np.uint8), b"labels": [3]})
    ops = {op.name for op, _, _ in pickletools.genops(data)}
    assert {"SHORT_BINSTRING", "BINSTRING", "GLOBAL", "REDUCE", "BUILD"} <= ops
    assert not ops & {"BINUNICODE", "SHORT_BINUNICODE", "STACK_GLOBAL", "FRAME"}
    assert b"numpy.core.multiarray\n_reconstruct" in data
    pickletools.dis(data, out=io.StringIO())  # a well-formed pickle (the stack checks pass)


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
@pytest.mark.parametrize("train", [True, False])
def test_reads_back_exactly(tmp_path: Path, writer: str, variant: str, train: bool) -> None:
    written = make_cifar(tmp_path, variant, WRITERS[writer])
    images, labels, classes = read_cifar(tmp_path, variant, train)  # type: ignore[arg-type]
    want_images, want_labels = expected_split(written, variant, train)
    assert images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert images.shape == want_images.shape
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)
    assert classes == written["classes"]
    # the extracted folder itself is accepted as root too
    again = read_cifar(tmp_path / CIFAR[variant].folder, variant, train)  # type: ignore[arg-type]
    np.testing.assert_array_equal(again[0], images)


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
@pytest.mark.parametrize("writer", ["py2", "py3-str-keys"])
def test_matches_torchvision(tmp_path: Path, variant: str, writer: str) -> None:
    from torchvision.datasets import CIFAR10, CIFAR100

    make_cifar(tmp_path, variant, WRITERS[writer])
    spec = CIFAR[variant]
    folder = tmp_path / spec.folder

    def sums(names: tuple[str, ...]) -> list[list[str]]:
        return [[n, _md5((folder / n).read_bytes()).hexdigest()] for n in names]

    base = CIFAR10 if variant == "cifar10" else CIFAR100
    # torchvision checks its published md5s; the subclass names those of the files written here
    local = type("Local", (base,), {"train_list": sums(spec.train), "test_list": sums(spec.test),
                                    "meta": {**base.meta, "md5": sums((spec.meta,))[0][1]}})
    for train in (True, False):
        reference = local(str(tmp_path), train=train)
        images, labels, classes = read_cifar(tmp_path, variant, train)  # type: ignore[arg-type]
        np.testing.assert_array_equal(images.transpose(0, 2, 3, 1), reference.data)
        assert labels.tolist() == reference.targets
        assert classes == reference.classes


# --- refused content ----------------------------------------------------------------------------------


class _Marker:
    """Pickles as a call that would create ``path`` if it were run."""

    def __init__(self, path: Path, how: str) -> None:
        self.path, self.how = path, how

    def __reduce__(self) -> tuple[Any, ...]:
        if self.how == "os.system":
            return os.system, (f"touch '{self.path}'",)
        if self.how == "eval":
            return eval, (f"open({str(self.path)!r}, 'w').close()",)
        return _Touch, (str(self.path),)  # a class of this module: its __init__ would run


class _Touch:
    def __init__(self, path: str) -> None:
        Path(path).touch()


@pytest.mark.parametrize("how", ["os.system", "eval", "custom class"])
@pytest.mark.parametrize("where", ["data", "meta"])
def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path: Path, how: str, where: str) -> None:
    written = make_cifar(tmp_path / "d", "cifar10")
    folder = tmp_path / "d" / CIFAR["cifar10"].folder
    # control: the ordinary unpickler does run the payload, so the test below can fail
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Marker(control, how), protocol=2))
    assert control.exists()

    marker = tmp_path / "marker"
    if where == "data":
        target = folder / "test_batch"
        target.write_bytes(pickle.dumps({b"data": _Marker(marker, how), b"labels": written["test_batch"][1]},
                                        protocol=2))
    else:
        target = folder / "batches.meta"
        target.write_bytes(pickle.dumps({"label_names": [_Marker(marker, how)]}, protocol=4))
    with pytest.raises(DataError, match=r"test_batch|batches\.meta") as info:
        read_cifar(tmp_path / "d", "cifar10", train=False)
    assert "refused without running anything" in str(info.value)
    # protocol 2 writes Python 2's module names (__builtin__), protocol 4 Python 3's
    named = {"os.system": r"asks to load posix\.system", "eval": r"asks to load (__builtin__|builtins)\.eval",
             "custom class": r"asks to load [\w.]*_Touch"}[how]
    assert re.search(named, str(info.value))
    assert not marker.exists()


def test_other_numpy_globals_and_codecs_are_refused(tmp_path: Path) -> None:
    make_cifar(tmp_path, "cifar10")
    path = tmp_path / CIFAR["cifar10"].folder / "test_batch"
    # numpy.load would read (and with allow_pickle, unpickle) another file: only the array rebuild is allowed
    path.write_bytes(b"\x80\x02cnumpy\nload\nU\x05/tmp/\x85R.")
    with pytest.raises(DataError, match=r"asks to load numpy\.load"):
        read_cifar(tmp_path, "cifar10", train=False)
    # _codecs.encode is allowed for latin1 text only (what Python 3 writes for bytes)
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R.")
    with pytest.raises(DataError, match=r"_codecs\.encode with a str and encoding 'zlib'"):
        read_cifar(tmp_path, "cifar10", train=False)
    path.write_bytes(b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R.")  # bytes(2**30): 1 GiB of zeros
    with pytest.raises(DataError, match=r"builtins\.bytes with arguments"):
        read_cifar(tmp_path, "cifar10", train=False)
    path.write_bytes(b"\x80\x02U\x03abcQ.")  # BINPERSID
    with pytest.raises(DataError, match="a persistent id"):
        read_cifar(tmp_path, "cifar10", train=False)


def _rewrite(root: Path, name: str, **changes: Any) -> None:
    path = root / CIFAR["cifar10" if "batch" in name else "cifar100"].folder / name
    entry = pickle.loads(path.read_bytes(), encoding="latin1")  # our own trusted test file
    entry.update(changes)
    path.write_bytes(pickle.dumps(entry, protocol=2))


@pytest.mark.parametrize(("changes", "message"), [
    ({"data": np.zeros((8, 3071), np.uint8)}, r"'data' is uint8 \[8, 3071\]; a CIFAR-10 batch holds uint8 \[N, 3072\]"),
    ({"data": np.zeros((8, 3072), np.int16)}, r"'data' is int16 \[8, 3072\]"),
    ({"data": np.zeros((8, 3, 32, 32), np.uint8)}, r"'data' is uint8 \[8, 3, 32, 32\]"),
    ({"data": [0] * 3072}, r"'data' is list"),
    ({"labels": [0, 1, 10, 2, 0, 0, 0, 0]}, r"label 10 at index 2 is outside \[0, 10\)"),
    ({"labels": [0, -1, 1, 2, 0, 0, 0, 0]}, r"label -1 at index 1 is outside \[0, 10\)"),
    ({"labels": [0, 1, 2, 0, 0, 0, 0]}, r"has 8 images but 7 labels"),
    ({"labels": [0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0]}, r"holds float64 values"),
    ({"labels": [[0, 1]] * 8}, r"holds int64 values of shape \[8, 2\]"),
    ({"labels": "01234567"}, r"'labels' is a str"),
])
def test_wrong_shapes_and_labels_are_refused(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    make_cifar(tmp_path, "cifar10")
    _rewrite(tmp_path, "test_batch", **{k: v for k, v in changes.items()})
    with pytest.raises(DataError, match=message):
        read_cifar(tmp_path, "cifar10", train=False)


def test_cifar100_fine_labels_range_and_meta(tmp_path: Path) -> None:
    make_cifar(tmp_path, "cifar100")
    _rewrite(tmp_path, "test", fine_labels=[100, 0, 0, 0])
    with pytest.raises(DataError, match=r"label 100 at index 0 is outside \[0, 100\) for CIFAR-100"):
        read_cifar(tmp_path, "cifar100", train=False)
    _rewrite(tmp_path, "meta", fine_label_names=["a"] * 99)
    with pytest.raises(DataError, match=r"'fine_label_names' is not a list of 100 names"):
        read_cifar(tmp_path, "cifar100", train=True)


def test_damaged_and_missing_files(tmp_path: Path) -> None:
    make_cifar(tmp_path, "cifar10")
    folder = tmp_path / CIFAR["cifar10"].folder
    data = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"test_batch' is not a readable CIFAR-10 pickle .*corrupt or truncated"):
        read_cifar(tmp_path, "cifar10", train=False)
    (folder / "test_batch").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(DataError, match=r"holds a list, not the dict"):
        read_cifar(tmp_path, "cifar10", train=False)
    (folder / "test_batch").write_bytes(pickle.dumps({b"labels": [1]}, protocol=2))
    with pytest.raises(DataError, match=r"has no 'data' entry"):
        read_cifar(tmp_path, "cifar10", train=False)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"CIFAR-10 is not in '.*cifar-10-batches-py' \(missing data_batch_3\)"):
        read_cifar(tmp_path, "cifar10", train=True)


# --- archives and the local HTTP mirror ----------------------------------------------------------------




def make_archive(tmp_path: Path, variant: str) -> tuple[Path, dict[str, Any]]:
    """``served/<archive>``: a tar.gz of a generated folder, as the originals are laid out."""
    spec = CIFAR[variant]
    written = make_cifar(tmp_path / "source", variant)
    archive = tmp_path / "served" / spec.archive
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "source" / spec.folder, arcname=spec.folder)
    return archive, written


@pytest.fixture
def cifar_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[LocalMirror, dict[str, Any]]]:
    archive, written = make_archive(tmp_path, "cifar10")
    spec = CIFAR["cifar10"]
    files = tuple((n, _md5((tmp_path / "source" / spec.folder / n).read_bytes()).hexdigest()) for n in spec.files)
    monkeypatch.setitem(CIFAR, "cifar10", replace(spec, md5=_md5(archive.read_bytes()).hexdigest(),
                                                  file_md5=spec.file_md5 + files))
    mirror = LocalMirror(archive.parent)
    yield mirror, written
    mirror.close()


def test_download_checks_md5_extracts_and_reuses(tmp_path: Path,
                                                cifar_mirror: tuple[LocalMirror, dict[str, Any]]) -> None:
    mirror, written = cifar_mirror
    root = tmp_path / "data"
    folder = ensure_cifar(root, "cifar10", [mirror.url])
    assert folder == root / "cifar-10-batches-py"
    assert mirror.requests == ["/cifar-10-python.tar.gz"]
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]  # no .part
    images, labels, _ = read_cifar(root, "cifar10", train=True)
    want_images, want_labels = expected_split(written, "cifar10", train=True)
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)
    assert ensure_cifar(root, "cifar10", [mirror.url]) == folder
    assert len(mirror.requests) == 1  # found: nothing downloaded again
    # the archive alone (folder deleted) is extracted without a download
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    assert ensure_cifar(root, "cifar10", [mirror.url]) == folder
    assert len(mirror.requests) == 1
    np.testing.assert_array_equal(read_cifar(root, "cifar10", train=True)[0], images)


def test_download_with_wrong_md5_is_refused(tmp_path: Path, cifar_mirror: tuple[LocalMirror, dict[str, Any]],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    mirror, _ = cifar_mirror
    monkeypatch.setitem(CIFAR, "cifar10", replace(CIFAR["cifar10"], md5="0" * 32))
    root = tmp_path / "data"
    with pytest.raises(DataError, match=r"checksum mismatch for http://127\.0\.0\.1:\d+/cifar-10-python\.tar\.gz"):
        ensure_cifar(root, "cifar10", [mirror.url])
    assert mirror.requests == ["/cifar-10-python.tar.gz"]
    assert list(root.iterdir()) == []  # neither the archive nor a .part file stays


def test_present_archive_with_wrong_md5_is_reported_not_replaced(
        tmp_path: Path, cifar_mirror: tuple[LocalMirror, dict[str, Any]]) -> None:
    mirror, _ = cifar_mirror
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz' does not have the known md5"):
        ensure_cifar(root, "cifar10", [mirror.url])
    assert mirror.requests == []


def test_offline_names_the_archive_and_the_folder(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "data"
    with pytest.raises(DataError) as info:
        ensure_cifar(root, "cifar100", [f"http://127.0.0.1:{port}/"])
    message = str(info.value)
    for part in ("CIFAR-100 is not in", "could not be downloaded", "cifar-100-python.tar.gz", "cifar-100-python/"):
        assert part in message
    assert "\n" not in message


def test_incomplete_folder_is_reported(tmp_path: Path) -> None:
    make_cifar(tmp_path, "cifar100")
    (tmp_path / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DataError, match=r"cifar-100-python' is incomplete \(missing meta\)"):
        ensure_cifar(tmp_path, "cifar100", [])


def _evil_archive(path: Path, member: tarfile.TarInfo, payload: bytes = b"pwned") -> None:
    with tarfile.open(path, "w:gz") as tar:
        good = tarfile.TarInfo("cifar-10-batches-py/readme.html")
        good.size = 2
        tar.addfile(good, io.BytesIO(b"hi"))
        member.size = len(payload) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(("member", "why"), [
    (tarfile.TarInfo("cifar-10-batches-py/../../escaped"), "has '..' in its path"),
    (tarfile.TarInfo("../escaped"), "has '..' in its path"),
    (tarfile.TarInfo("/tmp/escaped-cifar-absolute"), "has an absolute path"),
    (_link("cifar-10-batches-py/test_batch", "../../escaped", tarfile.SYMTYPE), "is a link to '../../escaped'"),
    (_link("cifar-10-batches-py/test_batch", "/etc/passwd", tarfile.LNKTYPE), "is a link to '/etc/passwd'"),
    (_link("cifar-10-batches-py/fifo", "", tarfile.FIFOTYPE), "is not a regular file or folder"),
])
def test_unsafe_archive_members_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            member: tarfile.TarInfo, why: str) -> None:
    root = tmp_path / "a" / "b" / "data"
    root.mkdir(parents=True)
    archive = root / "cifar-10-python.tar.gz"
    _evil_archive(archive, member)
    monkeypatch.setitem(CIFAR, "cifar10", replace(CIFAR["cifar10"], md5=_md5(archive.read_bytes()).hexdigest()))
    with pytest.raises(DataError, match=rf"member '{member.name}' {why}"):
        ensure_cifar(root, "cifar10", [])
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-python.tar.gz"]  # nothing extracted
    assert not (tmp_path / "a" / "escaped").exists()
    assert not (tmp_path / "a" / "b" / "escaped").exists()
    assert not Path("/tmp/escaped-cifar-absolute").exists()


def test_archive_without_the_files_and_damaged_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    _evil_archive(archive, tarfile.TarInfo("cifar-10-batches-py/data_batch_1"))
    monkeypatch.setitem(CIFAR, "cifar10", replace(CIFAR["cifar10"], md5=_md5(archive.read_bytes()).hexdigest()))
    with pytest.raises(DataError, match=r"does not hold data_batch_2, .*batches\.meta in cifar-10-batches-py/"):
        ensure_cifar(tmp_path, "cifar10", [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz"]  # the temp folder is gone
    archive.write_bytes(archive.read_bytes()[:30])
    monkeypatch.setitem(CIFAR, "cifar10", replace(CIFAR["cifar10"], md5=_md5(archive.read_bytes()).hexdigest()))
    with pytest.raises(DataError, match=r"is not a readable \.tar\.gz"):
        ensure_cifar(tmp_path, "cifar10", [])


def test_constants_are_torchvisions() -> None:
    from torchvision.datasets import CIFAR10, CIFAR100

    for variant, tv in (("cifar10", CIFAR10), ("cifar100", CIFAR100)):
        spec = CIFAR[variant]
        assert cifar_data.CIFAR_MIRRORS[0] + spec.archive == tv.url
        assert spec.md5 == tv.tgz_md5
        assert spec.archive == tv.filename
        assert spec.folder == tv.base_folder
        published = [*tv.train_list, *tv.test_list, [tv.meta["filename"], tv.meta["md5"]]]
        # the published sums come first; tests' synthetic files (_cifar_files.trust) append theirs after them
        assert [list(x) for x in spec.file_md5[:len(published)]] == published
        assert spec.names_key == tv.meta["key"]
