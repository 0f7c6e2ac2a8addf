"""Checkpoints: unwrapped state, atomic writes, safe loading.

* Writes go to a temporary file in the same folder, are fsync'd, then renamed over the target, so a
  crash at any moment leaves either the previous complete file or the new complete file.
* Every load uses ``torch.load(..., weights_only=True)``: a file that holds arbitrary Python objects
  (a malicious pickle) is refused without running it.
* Model state is saved unwrapped (no ``module.`` of DDP, no ``_orig_mod.`` of ``torch.compile``) so a
  checkpoint loads into a plain model anywhere.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CheckpointError

FORMAT = "distillistic-checkpoint"
FORMAT_VERSION = 1


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


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


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def save(obj: Mapping[str, Any], path: Path) -> None:
    """Atomically ``torch.save`` a checkpoint dict (stamped with the format and its version)."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": FORMAT_VERSION, **obj}, buffer)
    atomic_write(path, buffer.getvalue())


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only=True``), with one clear error for any problem."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"checkpoint '{path}' holds Python objects other than tensors and plain data; "
                              "refused to load it, since loading would run code from the file") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint '{path}' is damaged or not a PyTorch file ({type(e).__name__}); "
                              "use another checkpoint") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(obj).__name__}, not a state dict; "
                              "save model.state_dict() instead")
    return obj


def check_format(obj: Mapping[str, Any], path: Path) -> None:
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a distillistic checkpoint; pass it as a teacher/student weights "
                              "file instead")
    if obj.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format version {obj.get('version')}, newer than this "
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
            summary = json.loads(summary_path.read_text())
            name = summary.get("best_student") or next(iter(summary.get("models", {})), None)
        candidates = sorted((path / "checkpoints").glob("best-*.pt"))
        chosen = next((c for c in candidates if c.stem == f"best-{name}"), candidates[0] if candidates else None)
        if chosen is None:
            raise CheckpointError(f"run directory '{path}' has no checkpoints/best-*.pt; it is not a finished run")
        path = chosen
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path))), {}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"'{path}' is not a readable safetensors file ({e}); use another file") from None
    obj = load(path)
    if obj.get("format") == FORMAT:
        check_format(obj, path)
        models = obj.get("models", {})
        name = prefer if prefer in models else next(iter(models), None)
        if name is None:
            raise CheckpointError(f"checkpoint '{path}' holds no model weights")
        return models[name], {"arch": obj.get("arch", {}).get(name), "config": obj.get("config")}
    state = obj.get("state_dict", obj.get("model", obj))
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"'{path}' is not a model state dict (it holds {sorted(state)[:4]}...); save "
                              "model.state_dict()")
    return state, {}


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
