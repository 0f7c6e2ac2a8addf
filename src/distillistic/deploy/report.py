"""The figures of ``export.json`` as tables: on the terminal after an export, and in ``distillistic report``."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

COLUMNS = ("model", "precision", "test top-1", "ECE", "NLL", "parity gap", "MB", "latency ms (median / p90)",
           "images/s", "threads")


def _row(e: dict[str, Any]) -> list[str]:
    test, b = e.get("test") or {}, e.get("bench") or {}
    parity = e.get("parity") or {}
    gap = f"{parity['worst_relative_gap']:.1e}" if "worst_relative_gap" in parity else (
        f"top-1 agrees {100 * e['vs_fp32']['top1_agreement']:.2f} %" if "vs_fp32" in e else "–")
    latency = (f"{b['latency_ms_median']:.3f} / {b['latency_ms_p90']:.3f}" if "latency_ms_median" in b else "–")
    return [f"{e.get('folder', '')}/{e['name']}".lstrip("/"), e.get("precision", "?"),
            f"{100 * test['top1']:.2f} %" if "top1" in test else "–",
            f"{100 * test['ece']:.2f} %" if "ece" in test else "–", f"{test['nll']:.4f}" if "nll" in test else "–",
            gap, f"{e.get('bytes', 0) / 1e6:.3f}", latency,
            f"{b['throughput_images_per_s']:.0f}" if "throughput_images_per_s" in b else "–",
            str(b.get("threads", "–"))]


def export_table(entries: Sequence[dict[str, Any]]) -> str:
    """Plain-text table of export entries (one line each)."""
    rows = [list(COLUMNS), *(_row(e) for e in entries)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def find_exports(folders: Iterable[Path]) -> list[Path]:
    """Every ``export.json`` under ``folders`` (searched recursively), sorted."""
    return sorted({p for f in folders for p in Path(f).rglob("export.json")})


def markdown_section(folders: Iterable[Path]) -> list[str]:
    """The report's "Exported students" section (``[]`` when no run has an ONNX export)."""
    lines: list[str] = []
    for path in find_exports(folders):
        try:
            entries = json.loads(path.read_text()).get("models") or []
        except (OSError, ValueError, AttributeError):
            continue
        if not entries:
            continue
        lines += ["", f"`{path.parent}`:", "", "| " + " | ".join(COLUMNS) + " |",
                  "|" + " --- |" * len(COLUMNS)]
        lines += ["| " + " | ".join(_row(e)) + " |" for e in entries if isinstance(e, dict) and "name" in e]
    if not lines:
        return []
    return ["## Exported students", "", "ONNX exports (`distillistic export RUN --format onnx`): test metrics of "
            "each file, its parity with the PyTorch student (largest relative logit gap) or, for int8, its top-1 "
            "agreement with the float model; latency at batch 1 on CPU.", *lines, ""]
