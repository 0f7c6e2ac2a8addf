"""Files written safely and read safely: atomic writes, fault points, safe ``torch.load``.

* Writes go to a temporary file in the same folder, are fsync'd, then renamed over the target, so a
  crash at any moment leaves either the previous complete file or the new complete file.
* Every load uses ``torch.load(..., weights_only=True)``: a file that holds arbitrary Python objects
  (a malicious pickle) is refused without running it.

Fault injection (for the crash tests only): ``DISTILLISTIC_FAULT=point[:n[:SIGNAL[:group]]][,...]``
makes the process send itself (or, with ``group``, its whole process group) ``SIGNAL`` (default
``KILL``) the ``n``-th time (default 1) it reaches ``point``; see :func:`fault_point` for the points.

This module sits below every layer (with :mod:`distillistic.errors`): data, models and training all
write and read files through it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import re
import signal
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

if TYPE_CHECKING:  # torch itself is imported where a tensor is read or written: a report never needs it
    from torch import Tensor

from distillistic.errors import CheckpointError, UserError, short_repr

FORMAT = "distillistic-checkpoint"
FORMAT_VERSION = 2  # 2: every checkpoint carries the sha256 of its content (``CHECKSUM_KEY``)
CHECKSUM_KEY = "sha256"


_FAULT_HITS: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """Crash here if ``$DISTILLISTIC_FAULT`` asks for it (test hook; a no-op otherwise).

    Points: ``step`` (after every training step), ``mid-write-<file>`` (half of a temporary file
    written), ``before-rename-<file>`` (temporary file complete and fsync'd, not yet renamed),
    ``after-best`` (end of an epoch: best weights written, ``last.pt`` not yet), ``after-last``
    (``last.pt`` written, the epoch's metrics rows not yet), ``final`` (training done, test
    evaluation and summary not yet).
    """
    spec = os.environ.get("DISTILLISTIC_FAULT")
    if not spec:
        return
    _FAULT_HITS[name] += 1
    for item in spec.split(","):
        point, count, sig, group = [*item.strip().split(":"), "", "", ""][:4]
        if point == name and _FAULT_HITS[name] == int(count or 1):
            signum = getattr(signal, f"SIG{sig or 'KILL'}")
            if group == "group":  # the whole group, from another process: as a terminal's Ctrl-C or a scheduler
                import subprocess
                import sys

                subprocess.run([sys.executable, "-c", f"import os; os.killpg({os.getpgrp()}, {int(signum)})"],
                               check=False)
            else:
                os.kill(os.getpid(), signum)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _MidWriteFault(io.RawIOBase):
    """A file proxy that fires the ``mid-write`` fault point once its first chunk is on disk (tests only)."""

    def __init__(self, f: BinaryIO, name: str) -> None:
        super().__init__()
        self.f, self.name, self.fired = f, name, False

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = self.f.write(b)
        if not self.fired:
            self.fired = True
            self.f.flush()
            fault_point(f"mid-write-{self.name}")
        return n


_OS_HINTS = {
    errno.ENOSPC: "free some space or choose another folder",
    errno.EDQUOT: "free some space or choose another folder",
    errno.EROFS: "choose another folder",
    errno.EACCES: "check its permissions or choose another folder",
    errno.EPERM: "check its permissions or choose another folder",
    errno.ENAMETOOLONG: "use a shorter name",
    errno.ENOENT: "a folder on the path does not exist (a dangling symlink?); check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EEXIST: "something is in the way (a dangling symlink?); remove it or choose another path",
    errno.EISDIR: "a folder is in the way; remove it or choose another path",
}


def os_error_line(error: OSError, path: Path | str | None = None, action: str = "cannot write") -> str:
    """One line for an operating-system failure: the path, the cause and what to do (no traceback)."""
    where = path if path is not None else (error.filename if error.filename is not None else "?")
    cause = error.strerror or short_repr(str(error)).strip("'\"") or type(error).__name__
    hint = _OS_HINTS.get(error.errno or 0, "check the path and try again")
    return f"{action} '{short_path(where)}': {cause}; {hint}"


def short_path(path: Path | str, limit: int = 80) -> str:
    """A path for a message, its last name cut when very long (a 5000-character name must not flood it)."""
    p = Path(path)
    if len(p.name) <= limit:
        return str(path)
    return f"{p.parent / p.name[:limit // 2]}...({len(p.name)} characters)"


def _os_error_of(error: BaseException) -> OSError | None:
    """The OSError behind ``error`` (torch.save wraps a failed write into a RuntimeError)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], Any]) -> None:
    """Write ``data`` (bytes, or a function writing to a file) to ``path`` so that readers see the old or the
    new file, never a partial one. A function streams straight into the temporary file (no copy in memory).

    An operating-system failure (disk full, read-only folder, permissions, a name too long) raises a
    :class:`UserError` naming ``path`` and the cause; the previous file stays as it was.
    """
    try:
        _atomic_write(path, data)
    except (OSError, RuntimeError) as e:
        cause = _os_error_of(e)
        if cause is None:
            raise
        raise UserError(os_error_line(cause, path)) from None


def _atomic_write(path: Path, data: bytes | Callable[[BinaryIO], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            if callable(data):
                data(cast(BinaryIO, _MidWriteFault(f, path.name)))
            else:
                half = len(data) // 2
                f.write(data[:half])
                fault_point(f"mid-write-{path.name}")
                f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"before-rename-{path.name}")
        os.replace(tmp, path)  # atomic: readers see the previous complete file until here
    except BaseException:  # an error or a second Ctrl-C: leave no partial temporary behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temporary files left in ``folder`` by writers that died before their rename."""
    removed = []
    for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def state_dict_hash(state: Mapping[str, Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes: the identity of a set of weights."""
    import torch

    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def content_hash(obj: Any) -> str:
    """sha256 over a checkpoint's content: every tensor's dtype, shape and bytes and every plain value, in
    order (dicts keep their insertion order through ``torch.save``/``torch.load``)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    torch = sys.modules.get("torch")  # no tensor exists before torch is imported
    if torch is not None and isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}|".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, list | tuple):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}|".encode())
        for value in obj:
            _feed(h, value)
    else:
        h.update(f"{type(obj).__name__}:{obj!r}|".encode())


def save(obj: Mapping[str, Any], path: Path) -> None:
    """Atomically ``torch.save`` a checkpoint dict, stamped with the format, its version and the sha256 of its
    content (:func:`content_hash`), which :func:`load` verifies."""
    import torch

    stamped = {"format": FORMAT, "version": FORMAT_VERSION, **obj}
    stamped[CHECKSUM_KEY] = content_hash(stamped)
    atomic_write(path, lambda f: torch.save(stamped, f))


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only=True``), with one clear error for any problem.

    One of our checkpoints (format version 2 on) must match the checksum it carries: a flipped byte in a
    tensor is refused (:class:`CheckpointError`) instead of resuming on damaged weights.
    """
    obj = _load(path)
    if obj.get("format") == FORMAT and isinstance(obj.get("version"), int) and 2 <= obj["version"] <= FORMAT_VERSION:
        recorded = obj.pop(CHECKSUM_KEY, None)
        if recorded != content_hash(obj):
            raise CheckpointError(f"checkpoint '{short_path(path)}' fails its integrity check (the sha256 of its "
                                  f"content {'is missing' if recorded is None else 'differs from the recorded one'})"
                                  ": the file is damaged; use another checkpoint or start a new --out")
    return obj


def _load(path: Path) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; check the path")
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": one line per error, nothing more
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(f"checkpoint '{path}' holds the Python object {found.group(1)}, and loading it "
                                  "would run code from the file: refused; use a file of tensors and plain data "
                                  "(model.state_dict()) or .safetensors") from None
        op = re.search(r"Unsupported operand (\d+)", str(e))
        raise CheckpointError(f"checkpoint '{path}' is not a file a safe load (weights_only) can read"
                              f"{f' (pickle opcode {op.group(1)})' if op else ''}: it is damaged or holds Python "
                              "objects; use a file of tensors and plain data (model.state_dict()) or .safetensors"
                              ) from None
    except Exception as e:  # the file is user input: any failure to parse it means "damaged"
        raise CheckpointError(f"checkpoint '{path}' is damaged or not a PyTorch file ({type(e).__name__}); "
                              "use another checkpoint") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(obj).__name__}, not a state dict; "
                              "save model.state_dict() instead")
    return obj


def check_format(obj: Mapping[str, Any], path: Path) -> None:
    """Refuse a file that is not one of our checkpoints, or one written by a newer format."""
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a distillistic checkpoint; pass it as a teacher/student weights "
                              "file instead")
    version = obj.get("version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"checkpoint '{path}' has no valid format version ({short_repr(version)}); it is damaged")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format version {version}, newer than this "
                              f"distillistic's {FORMAT_VERSION}; upgrade distillistic to read it")


def one_line_of(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
