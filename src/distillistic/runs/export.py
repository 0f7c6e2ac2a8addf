"""``distillistic export``: a run's students as ``.safetensors`` files.

safetensors holds tensors and a string-to-string header only, so an exported file can be shared and
loaded without any pickle. Each file carries, as JSON in its metadata, the student's architecture
(``arch``), class count (``num_classes``), name and the run's resolved ``config``; read it back with
:func:`distillistic.training.checkpoint.read_state_dict` (``--teacher-weights FILE`` / ``--student-weights FILE``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from distillistic.errors import CheckpointError, UserError
from distillistic.training.checkpoint import check_format, load, write_safetensors


def run_checkpoints(run_dir: Path, which: str = "best", command: str = "export") -> list[tuple[str, Path]]:
    """``(folder, checkpoint)`` of every student of ``run_dir``: ``folder`` is ``""``, or ``gen<g>`` for each
    generation of a run trained as generations (``ban``); refuses a path that is not a run with a finished epoch.

    ``which="best"``: each student's best-on-val weights (``checkpoints/best-<name>.pt``, EMA copies included),
    ``"last"``: the latest checkpoint (``checkpoints/last.pt``, every model in one file).
    """
    if not run_dir.is_dir():
        raise UserError(f"{command}: '{run_dir}' is not a directory; pass a run directory of 'distillistic train'")
    folder = run_dir / "checkpoints"
    generations = sorted(p.parent for p in run_dir.glob("gen*/checkpoints"))
    if not folder.is_dir() and generations:  # a run trained as generations (ban): each one's students
        return [(g.name, p) for g in generations for _, p in run_checkpoints(g, which, command)]
    sources = sorted(folder.glob("best-*.pt")) if which == "best" else [folder / "last.pt"]
    sources = [p for p in sources if p.is_file()]
    if not sources:
        wanted = "checkpoints/best-*.pt" if which == "best" else "checkpoints/last.pt"
        raise CheckpointError(f"{command}: '{run_dir}' has no {wanted}; it is not a run directory, or no epoch has "
                              "finished yet" + (" (try --which last)" if which == "best" else ""))
    return [("", p) for p in sources]


def export_run(run_dir: Path, out: Path | None = None, which: str = "best", overwrite: bool = False) -> list[Path]:
    """Write ``<out>/<student>.safetensors`` for every student of ``run_dir``; return the paths written.

    ``which="best"`` exports each student's best-on-val weights (``checkpoints/best-<name>.pt``),
    ``"last"`` the weights of the latest checkpoint (``checkpoints/last.pt``). A run trained as generations
    (``ban``) exports every generation's students to ``<out>/gen<g>/``.
    """
    checkpoints = run_checkpoints(run_dir, which)
    if checkpoints[0][0]:  # generations: each one's own folder, manifest and students
        base = out if out is not None else run_dir / "export"
        folders = sorted({f for f, _ in checkpoints})
        return [p for g in folders for p in export_run(run_dir / g, base / g, which, overwrite)]
    sources = [p for _, p in checkpoints]
    out = out if out is not None else run_dir / "export"
    planned: list[tuple[Path, dict[str, Tensor], dict[str, Any]]] = []
    try:  # the inputs the students read: size, channels, normalisation (from the run's manifest, when it has them)
        data = json.loads((run_dir / "manifest.json").read_text()).get("dataset") or {}
    except (OSError, ValueError, AttributeError):
        data = {}
    keys = ("image_size", "channels", "mean", "std", "name", "class_names", "source")
    inputs = {k: data[k] for k in keys if k in data}
    for source in sources:
        ckpt = load(source)
        check_format(ckpt, source)
        models, arch = ckpt.get("models"), ckpt.get("arch")
        if not isinstance(models, dict) or not models or not isinstance(arch, dict):
            raise CheckpointError(f"export: checkpoint '{source}' holds no model weights; it is damaged")
        for name, state in models.items():
            epoch = ckpt["epoch"] if "epoch" in ckpt else (ckpt.get("progress") or {}).get("epoch")
            meta = {"name": name, "arch": arch.get(name), "num_classes": ckpt.get("num_classes"),
                    "config": ckpt.get("config"), "which": which, "epoch": epoch, "inputs": inputs}
            planned.append((out / f"{name}.safetensors", state, meta))
    existing = [str(p) for p, _, _ in planned if p.exists()]
    if existing and not overwrite:
        raise UserError(f"export: '{existing[0]}' already exists; pass --overwrite to replace it, or choose "
                        "another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"export: --out '{out}' is a file; choose a directory path")
    for path, state, meta in planned:
        write_safetensors(state, path, meta)
    return [p for p, _, _ in planned]

