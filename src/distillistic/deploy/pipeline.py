"""``distillistic export RUN --format onnx [--quantize int8]``: every student as ONNX, checked, measured.

For each student of the run (cohort members, EMA copies, every generation of ``ban``): the ONNX export
(:mod:`~distillistic.deploy.onnx_export`), run by ONNX Runtime on the run's test split against the PyTorch
student through the run's own evaluation code (:mod:`~distillistic.deploy.evaluate`; the export is refused
and removed on a gap), the test top-1, ECE and NLL of every file, the int8 model's cost against the float one,
and latency and throughput (:mod:`~distillistic.deploy.bench`). All of it goes to ``export.json`` beside the files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distillistic import config as config_mod
from distillistic.config import Config
from distillistic.data.loader import DataBundle, build_data
from distillistic.deploy import bench as bench_mod
from distillistic.deploy.evaluate import (
    batches,
    calibration_source,
    check_calibration,
    check_parity,
    compare,
    reference_logits,
    scores,
    session_logits,
)
from distillistic.deploy.onnx_export import export_onnx, metadata, require, session, version
from distillistic.deploy.quantize import METHOD, quantize_int8
from distillistic.deploy.students import Student, read_manifest_data, run_students
from distillistic.errors import UserError
from distillistic.fileio import atomic_write_json, load
from distillistic.runs.export import run_checkpoints
from distillistic.training import setup


def _planned(run_dir: Path, out: Path, which: str, quantize: str | None) -> list[Path]:
    """The files an export will write (read from the checkpoints' model names, before any work)."""
    paths = []
    for folder, ckpt in run_checkpoints(run_dir, which):
        for name in (load(ckpt).get("models") or {}):
            paths.append(out / folder / f"{name}.onnx")
            if quantize:
                paths.append(out / folder / f"{name}.int8.onnx")
    return paths


def _data(folder: Path, data_root: str | None = None) -> tuple[Config, DataBundle]:
    """The run's resolved config and its data (in ``data_root`` if given), refused if it changed since the run."""
    if not (folder / "config.yaml").is_file():
        raise UserError(f"export: '{folder}' has no config.yaml; it is not a run directory")
    cfg = setup.resolve(config_mod.load(folder / "config.yaml"))
    if data_root:
        cfg = cfg.replace(data_root=data_root)
    bundle = build_data(cfg)
    recorded = read_manifest_data(folder).get("checksum")
    if recorded and bundle.info.checksum and recorded != bundle.info.checksum:
        raise UserError(f"export: the data of '{folder}' changed since the run (its checksum differs from "
                        "manifest.json's); parity is checked on the run's own test split: pass --data-root "
                        "pointing at the data it was trained on")
    if len(bundle.splits["test"]) == 0:
        raise UserError(f"export: the run '{folder}' has no test split; parity is checked on it")
    return cfg, bundle


def _facts(bundle: DataBundle) -> dict[str, Any]:
    info = bundle.info
    source = "memory" if hasattr(bundle.splits["test"], "images") else "files"
    return {"image_size": info.image_size, "channels": info.channels, "mean": list(info.mean),
            "std": list(info.std), "class_names": list(info.class_names), "source": source}


def export_onnx_run(run_dir: Path, out: Path | None = None, which: str = "best", quantize: str | None = None,
                    overwrite: bool = False, calibration_images: int = 512, bench: bool = True,
                    threads: int = 1, data_root: str | None = None) -> dict[str, Any]:
    """Export every student of ``run_dir`` as ONNX (and int8); write and return ``export.json``. ``data_root``:
    where the run's data is now (default: its config's)."""
    require("export --format onnx")
    out = out if out is not None else run_dir / "export"
    if out.exists() and not out.is_dir():
        raise UserError(f"export: --out '{out}' is a file; choose a directory path")
    existing = [p for p in _planned(run_dir, out, which, quantize) if p.exists()]
    if existing and not overwrite:
        raise UserError(f"export: '{existing[0]}' already exists; pass --overwrite to replace it, or choose "
                        "another --out")
    if quantize:
        check_calibration(calibration_images)  # before any work
    folders = sorted({f for f, _ in run_checkpoints(run_dir, which)})
    data = {f: _data(run_dir / f, data_root) for f in folders}
    students = run_students(run_dir, which, {f: _facts(b) for f, (_, b) in data.items()})
    entries = []
    for s in students:
        cfg, bundle = data[s.folder]
        entries += _export_one(s, cfg, bundle, out / s.folder, quantize, calibration_images, bench, threads)
    return _write_manifest(out, run_dir, which, entries) | {"exported": entries, "path": str(out / "export.json")}


def _export_one(s: Student, cfg: Config, bundle: DataBundle, out: Path, quantize: str | None, calibration: int,
                bench: bool, threads: int) -> list[dict[str, Any]]:
    """The fp32 (and int8) export of one student, checked and measured; its ``export.json`` entries."""
    label = f"{s.folder}/{s.name}".lstrip("/")
    path = out / f"{s.name}.onnx"
    test = bundle.splits["test"]
    export_onnx(s.module, path, metadata(s.module, s.name, s.arch, s.config, "fp32"), label)
    try:
        sess = session(path, threads)
        got = session_logits(sess, test, bundle.info, cfg)
        ref, labels = reference_logits(s.module, test, bundle.info, cfg)
        parity = compare(got, ref)
        check_parity(parity, label, "test")
    except BaseException:
        path.unlink(missing_ok=True)  # a model that fails its check is not left behind
        raise
    base = {"name": s.name, "folder": s.folder, "arch": s.arch, "epoch": s.epoch, "format": "onnx",
            "class_names": list(s.module.class_names), "input_size": s.module.inputs.image_size}
    fp32 = base | {"precision": "fp32", "file": str(path), "bytes": path.stat().st_size,
                   "test": scores(got, labels), "pytorch_test": scores(ref, labels), "parity": parity.to_json()}
    if bench:
        fp32["bench"] = bench_mod.measure(bench_mod.onnx_runner(sess), s.module.inputs, threads)
    if not quantize:
        return [fp32]
    qpath = out / f"{s.name}.int8.onnx"
    source = calibration_source(bundle.splits["train"], calibration, cfg.data_seed or 0)
    quantize_int8(path, qpath, (x for x, _ in batches(source, bundle.info, cfg, 64)),
                  metadata(s.module, s.name, s.arch, s.config, "int8"))
    qsess = session(qpath, threads)
    qgot = session_logits(qsess, test, bundle.info, cfg)
    int8 = base | {"precision": "int8", "file": str(qpath), "bytes": qpath.stat().st_size,
                   "test": scores(qgot, labels), "vs_fp32": _cost(qgot, got, labels),
                   "quantization": {"method": METHOD, "calibration_split": "train",
                                    "calibration_images": len(source)}}
    if bench:
        int8["bench"] = bench_mod.measure(bench_mod.onnx_runner(qsess), s.module.inputs, threads)
    return [fp32, int8]


def _cost(q: Any, f: Any, labels: Any) -> dict[str, float]:
    """What quantization changed: top-1 agreement with the float model, and the metrics' differences."""
    a, b = scores(q, labels), scores(f, labels)
    return {"top1_agreement": float((q.argmax(1) == f.argmax(1)).double().mean()),
            **{f"delta_{k}": a[k] - b[k] for k in ("top1", "ece", "nll")}}


def _write_manifest(out: Path, run_dir: Path, which: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """``out/export.json``: these entries, plus the earlier ones of files not exported again."""
    path = out / "export.json"
    try:
        earlier = json.loads(path.read_text()).get("models", []) if path.is_file() else []
    except (OSError, ValueError, AttributeError):
        earlier = []
    files = {e["file"] for e in entries}
    kept = [e for e in earlier if isinstance(e, dict) and e.get("file") not in files]
    result = {"run": str(run_dir), "which": which, "distillistic": version(), "models": [*kept, *entries]}
    atomic_write_json(path, result)
    return result
