"""Checkpoints of models: unwrapped state, reading weights from any source, safetensors export.

* Model state is saved unwrapped (no ``module.`` of DDP, no ``_orig_mod.`` of ``torch.compile``) so a
  checkpoint loads into a plain model anywhere.
* Students are exported as ``.safetensors`` (no pickle at all) with their architecture, class count
  and config in the file's metadata; :func:`read_state_dict` reads them back as teacher or student
  weights.
* Atomic writes, fault points and the safe ``torch.load`` are in :mod:`distillistic.fileio` (re-exported
  here, so the checkpoint API reads as one module).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from distillistic.errors import CheckpointError, UserError
from distillistic.fileio import (  # noqa: F401  (re-exported: the checkpoint API in one place)
    FORMAT,
    FORMAT_VERSION,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    check_format,
    fault_point,
    load,
    one_line_of,
    remove_stale_temporaries,
    save,
    state_dict_hash,
)
from distillistic.models.builders import head_name


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


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
        for key in ("arch", "num_classes", "config", "name", "inputs", "epoch", "which"):
            try:
                meta[key] = json.loads(raw_meta[key]) if key in raw_meta else None
            except ValueError:
                raise CheckpointError(f"'{path}' has damaged metadata ('{key}'); export it again") from None
    if not state:
        raise CheckpointError(f"'{path}' holds no tensors; use another file")
    return state, meta


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
