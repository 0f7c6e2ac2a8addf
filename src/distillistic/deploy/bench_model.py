"""``distillistic bench-model FILE``: latency and throughput of exported students, side by side.

``FILE``: an ``.onnx`` file (with its ``.int8.onnx`` sibling when there is one, or the float one beside an int8
file), a folder of ``.onnx`` exports, a run directory (its ``export/`` folder's ``.onnx`` files; else its
students in PyTorch) or a ``.safetensors`` export (PyTorch).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from distillistic.deploy import bench
from distillistic.deploy.graph import Inputs
from distillistic.errors import UserError

Target = tuple[str, str, Callable[[], tuple[bench.Runner, Inputs]]]  # label, runtime, make


def _onnx(path: Path, threads: int) -> Target:
    def make() -> tuple[bench.Runner, Inputs]:
        from distillistic.deploy.onnx_export import onnx_inputs, read_onnx, require, session

        require("bench-model with an .onnx file")
        _, props = read_onnx(path)
        return bench.onnx_runner(session(path, threads)), onnx_inputs(props, path)[0]

    return str(path), "onnxruntime", make


def _torch(path: Path, threads: int, name: str | None = None) -> Target:
    def make() -> tuple[bench.Runner, Inputs]:
        from distillistic.deploy.students import load_student

        module = load_student(path, name)
        return bench.torch_runner(module, threads), module.inputs

    return f"{path}" + (f" ({name})" if name else ""), "pytorch", make


def _siblings(path: Path) -> list[Path]:
    """An .onnx file and its float / int8 counterpart beside it, float first."""
    stem = path.name.removesuffix(".onnx").removesuffix(".int8")
    pair = [path.with_name(f"{stem}.onnx"), path.with_name(f"{stem}.int8.onnx")]
    return [p for p in pair if p.is_file()] if path.is_file() else [path]


def targets(path: Path, threads: int) -> list[Target]:
    """What ``bench-model PATH`` measures."""
    if path.suffix == ".onnx":
        return [_onnx(p, threads) for p in _siblings(path)]
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise UserError(f"bench-model: '{path}' does not exist")
        return [_torch(path, threads)]
    if not path.is_dir():
        raise UserError(f"bench-model: '{path}' is not an .onnx or .safetensors file nor a run directory")
    found = sorted(path.glob("*.onnx")) or sorted((path / "export").rglob("*.onnx"))
    if found:
        return [_onnx(p, threads) for p in found]
    from distillistic.deploy.students import run_students

    return [_torch(path, threads, f"{s.folder}/{s.name}".lstrip("/"))
            for s in run_students(path, command="bench-model")]


def bench_model(path: Path, threads: int = 1, batch: int = 256, budget_s: float = 2.0) -> list[dict[str, Any]]:
    """The figures of every target of ``path`` (:func:`distillistic.deploy.bench.measure`)."""
    if threads < 1 or batch < 1:
        raise UserError(f"bench-model: --threads {threads} --batch {batch}: both must be whole numbers >= 1")
    rows = []
    for label, runtime, make in targets(path, threads):
        runner, inputs = make()
        size = Path(label).stat().st_size if Path(label).is_file() else None
        rows.append({"model": label, "runtime": runtime, "bytes": size,
                     **bench.measure(runner, inputs, threads, batch, budget_s)})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = ["model", "runtime", "MB", "latency ms median", "p90", "images/s", "batch", "threads", "load"]
    body = [[r["model"], r["runtime"], f"{r['bytes'] / 1e6:.3f}" if r["bytes"] else "–",
             f"{r['latency_ms_median']:.3f}", f"{r['latency_ms_p90']:.3f}", f"{r['throughput_images_per_s']:.0f}",
             str(r["throughput_batch"]), str(r["threads"]),
             f"{r['load_average_1min']:.2f}" if r["load_average_1min"] is not None else "–"] for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in [head, *body])
