"""Checkpoints: unwrapped state, atomic writes, safe loading.

* Writes go to a temporary file in the same folder, are fsync'd, then renamed over the target, so a
  crash at any moment leaves either the previous complete file or the new complete file.
* Every load uses ``torch.load(..., weights_only=True)``: a file that holds arbitrary Python objects
  (a malicious pickle) is refused without running it.
* Model state is saved unwrapped (no ``module.`` of DDP, no ``_orig_mod.`` of ``torch.compile``) so a
  checkpoint loads into a plain model anywhere.
* Students are exported as ``.safetensors`` (no pickle at all) with their architecture, class count
  and config in the file's metadata; :func:`read_state_dict` reads them back as teacher or student
  weights.

Fault injection (for the crash tests only): ``DISTILLISTIC_FAULT=point[:n[:SIGNAL[:group]]][,...]``
makes the process send itself (or, with ``group``, its whole process group) ``SIGNAL`` (default
``KILL``) the ``n``-th time (default 1) it reaches ``point``; see :func:`fault_point` for the points.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import signal
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch
from torch import Tensor, nn

from .errors import CheckpointError, UserError

FORMAT = "distillistic-checkpoint"
FORMAT_VERSION = 1


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


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


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], Any]) -> None:
    """Write ``data`` (bytes, or a function writing to a file) to ``path`` so that readers see the old or the
    new file, never a partial one. A function streams straight into the temporary file (no copy in memory)."""
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
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
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
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save(obj: Mapping[str, Any], path: Path) -> None:
    """Atomically ``torch.save`` a checkpoint dict (stamped with the format and its version)."""
    stamped = {"format": FORMAT, "version": FORMAT_VERSION, **obj}
    atomic_write(path, lambda f: torch.save(stamped, f))


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only=True``), with one clear error for any problem."""
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
        raise CheckpointError(f"checkpoint '{path}' has no valid format version ({version!r}); it is damaged")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format version {version}, newer than this "
                              f"distillistic's {FORMAT_VERSION}; upgrade distillistic to read it")


def read_state_dict(path: Path, prefer: str | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A model state dict from a run directory, one of our checkpoints, a ``.pt``/``.pth`` or ``.safetensors``.

    Returns ``(state_dict, meta)``; ``meta`` has ``arch`` and ``config`` when the source records them.
    From a run directory the best-on-val weights of ``prefer`` (or of its best student) are taken.
    """
    if path.is_dir():
        summary_path = path / "summary.json"
        name = prefer
        if name is None and summary_path.is_file():
            try:
                summary = json.loads(summary_path.read_text())
                name = summary.get("best_student") or next(iter(summary.get("models", {})), None)
            except (OSError, ValueError, AttributeError):
                name = None  # a damaged summary: fall back to the first best-*.pt
        candidates = sorted((path / "checkpoints").glob("best-*.pt"))
        chosen = next((c for c in candidates if c.stem == f"best-{name}"), candidates[0] if candidates else None)
        if chosen is None:
            raise CheckpointError(f"run directory '{path}' has no checkpoints/best-*.pt; it is not a finished run")
        path = chosen
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    obj = load(path)
    if obj.get("format") == FORMAT:
        check_format(obj, path)
        models = obj.get("models")
        if not isinstance(models, dict) or not models:
            raise CheckpointError(f"checkpoint '{path}' holds no model weights; use a best-*.pt or last.pt file")
        name = prefer if prefer in models else next(iter(models))
        arch = obj.get("arch")
        return models[name], {"arch": arch.get(name) if isinstance(arch, dict) else None,
                              "num_classes": obj.get("num_classes"), "config": obj.get("config")}
    state = obj.get("state_dict", obj.get("model", obj))
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        keys = sorted(map(str, state))[:4] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"'{path}' is not a model state dict (it holds {keys}); save model.state_dict()")
    return state, {}


SAFETENSORS_FORMAT = "distillistic-weights"


def write_safetensors(state: Mapping[str, Tensor], path: Path, meta: Mapping[str, Any]) -> None:
    """Write one model's weights as ``.safetensors`` (atomically); ``meta`` values are stored as JSON."""
    from safetensors.torch import save as st_save

    # safetensors refuses tensors that share memory; a copy of each makes every tensor its own.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    metadata = {"format": SAFETENSORS_FORMAT, "version": str(FORMAT_VERSION)}
    metadata |= {k: json.dumps(v) for k, v in meta.items()}
    atomic_write(path, st_save(tensors, metadata=metadata))


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Weights and metadata of a ``.safetensors`` file (ours carry ``arch``, ``num_classes``, ``config``)."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"weights file '{path}' does not exist; check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:  # SafetensorError, OSError, ...: the file is user input
        raise CheckpointError(f"'{path}' is not a readable safetensors file ({one_line_of(e)}); "
                              "use another file") from None
    meta: dict[str, Any] = {}
    if raw_meta.get("format") == SAFETENSORS_FORMAT:
        for key in ("arch", "num_classes", "config", "name"):
            try:
                meta[key] = json.loads(raw_meta[key]) if key in raw_meta else None
            except ValueError:
                raise CheckpointError(f"'{path}' has damaged metadata ('{key}'); export it again") from None
    if not state:
        raise CheckpointError(f"'{path}' holds no tensors; use another file")
    return state, meta


def one_line_of(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def load_weights(model: nn.Module, state: Mapping[str, Tensor], source: str, arch: str) -> None:
    """Load ``state`` into ``model`` strictly; explain a class-count or architecture mismatch in one line."""
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"'{source}' does not fit architecture '{arch}': {len(missing)} missing keys (e.g. "
            f"{missing[:2]}) and {len(unexpected)} unexpected keys (e.g. {unexpected[:2]}); pass the "
            "architecture the weights were trained with")
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        from .models import head_name

        head = head_name(model) + ".weight"
        if len(wrong) <= 2 and all(k.startswith(head.rsplit(".", 1)[0]) for k, *_ in wrong):
            got = state[head].shape[0]
            raise CheckpointError(f"'{source}' has a {got}-class head but the dataset has {own[head].shape[0]} "
                                  "classes; use weights trained on this dataset")
        k, got_shape, want_shape = wrong[0]
        raise CheckpointError(f"'{source}' does not fit architecture '{arch}': {k} has shape {got_shape}, "
                              f"expected {want_shape}; pass the architecture the weights were trained with")
    model.load_state_dict(state)


def load_model_weights(model: nn.Module, path: Path, arch: str, role: str, flag: str, choices: str) -> None:
    """Load a ``role`` model's weights (a run directory, checkpoint, state dict or ``.safetensors``) into
    ``model``, refusing a missing path, another recorded architecture, or weights that do not fit."""
    if not path.exists():
        raise UserError(f"{role} weights '{path}' not found: use {choices} or an existing checkpoint, run "
                        "directory or .safetensors path")
    state, meta = read_state_dict(path)
    if meta.get("arch") and meta["arch"] != arch:
        raise CheckpointError(f"{role} weights '{path}' are a {meta['arch']} but {flag} is {arch}; "
                              f"pass {flag} {meta['arch']}")
    load_weights(model, state, str(path), arch)
