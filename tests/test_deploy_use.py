"""Using an exported student: ``distillistic predict`` (top-k of image files, the run's own test top-1 on its
test images), ``distillistic bench-model`` (latency and throughput, float and int8 side by side), and exports
of a torchvision ResNet and a timm model (slow). ONNX parts skip without the optional extra ``deploy``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _util import run_cli
from distillistic import Config, train
from distillistic import config as config_mod
from distillistic.data.loader import build_data
from distillistic.training import setup
from test_deploy_export import TINY, needs_deploy

pytestmark = pytest.mark.e2e  # every test trains a run or exports one (seconds)

@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("use")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTILLISTIC_CACHE", str(root / "cache"))
        train(Config(out=str(root / "run"), model="cnn", **TINY))  # type: ignore[arg-type]
    return root / "run"


def _test_images(run: Path, folder: Path) -> list[int]:
    """The run's test images as PNG files ``folder/<i>.png`` (in order); their labels."""
    from PIL import Image

    test = build_data(setup.resolve(config_mod.load(run / "config.yaml"))).splits["test"]
    folder.mkdir()
    for i, image in enumerate(test.images):  # type: ignore[union-attr]
        Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{i:04d}.png")
    return [int(y) for y in test.labels]


def _top1(out: str, labels: list[int]) -> float:
    predicted = [line.split(": ")[1].split(" ")[0] for line in out.strip().splitlines()]
    assert len(predicted) == len(labels)
    return float(np.mean([p == str(y) for p, y in zip(predicted, labels)]))


def test_predict_gives_the_runs_test_top1_on_its_test_images(run: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    labels = _test_images(run, tmp_path / "test")
    summary = json.loads((run / "summary.json").read_text())
    rc, out, err = run_cli(["predict", str(run), str(tmp_path / "test"), "--top", "3"], capsys)
    assert rc == 0, err
    assert _top1(out, labels) == pytest.approx(summary["models"]["student"]["test"]["top1"], abs=1e-9)
    first = out.splitlines()[0]
    assert first.startswith(f"{tmp_path / 'test' / '0000.png'}: ")
    probs = [float(x.split(" ")[1]) for x in first.split(": ")[1].split(", ")]
    assert len(probs) == 3
    assert probs == sorted(probs, reverse=True)


def test_predict_refuses_an_image_it_cannot_decode(run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rc, out, err = run_cli(["predict", str(run), str(bad)], capsys)
    assert (rc, out) == (2, "")
    assert err == [f"distillistic: error: image file '{bad}' cannot be decoded (UnidentifiedImageError); remove or "
                   "replace it"]
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(["predict", str(run), str(tmp_path / "empty")], capsys)
    assert rc == 2
    assert err[0].startswith(f"distillistic: error: predict: folder '{tmp_path / 'empty'}' holds no image files")


def test_bench_model_of_a_run_without_exports_measures_its_pytorch_student(run: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from distillistic.deploy.bench_model import bench_model

    rows = bench_model(run, threads=1, batch=8, budget_s=0.05)
    assert [r["runtime"] for r in rows] == ["pytorch"]
    r = rows[0]
    assert 0 < r["latency_ms_median"] <= r["latency_ms_p90"]
    assert r["latency_runs"] >= 20
    assert r["throughput_images_per_s"] > 0
    assert (r["threads"], r["throughput_batch"]) == (1, 8)
    rc, _, err = run_cli(["bench-model", str(run), "--threads", "0"], capsys)
    assert (rc, err) == (2, ["distillistic: error: bench-model: --threads 0 --batch 256: both must be whole numbers "
                             ">= 1"])


@needs_deploy
def test_onnx_predict_and_bench_side_by_side(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from distillistic.deploy.bench_model import bench_model

    rc, _, err = run_cli(["export", str(run), "--format", "onnx", "--quantize", "int8", "--out", str(tmp_path / "e"),
                          "--calibration-images", "16", "--no-bench"], capsys)
    assert rc == 0, err
    labels = _test_images(run, tmp_path / "test")
    rc, out, err = run_cli(["predict", str(tmp_path / "e" / "student.onnx"), str(tmp_path / "test")], capsys)
    assert rc == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert _top1(out, labels) == pytest.approx(summary["models"]["student"]["test"]["top1"], abs=1e-9)
    rows = bench_model(tmp_path / "e" / "student.int8.onnx", batch=8, budget_s=0.05)
    assert [Path(r["model"]).name for r in rows] == ["student.onnx", "student.int8.onnx"]
    assert rows[1]["bytes"] < rows[0]["bytes"]
    corrupt = tmp_path / "e" / "broken.onnx"
    corrupt.write_bytes((tmp_path / "e" / "student.onnx").read_bytes()[:500])
    for argv in (["predict", str(corrupt), str(tmp_path / "test" / "0000.png")], ["bench-model", str(corrupt)]):
        rc, _, err = run_cli(argv, capsys)
        assert rc == 2
        assert len(err) == 1
        assert err[0].startswith(f"distillistic: error: '{corrupt}' is not a readable ONNX model (")


@pytest.mark.slow
@needs_deploy
@pytest.mark.parametrize("model", ["resnet18", "timm/resnet10t"])
def test_a_torchvision_and_a_timm_student_export_with_parity(model: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """ResNet-18 (torchvision; grayscale expanded to RGB in the graph) and a timm ResNet (its own ImageNet
    normalisation in the graph), at 16 px read from 32 px data: parity and the run's own test top-1."""
    if model.startswith("timm/"):
        pytest.importorskip("timm", reason="timm is not installed (pip install '.[timm]')")
    out = tmp_path / "run"
    keys = {**TINY, "image_size": 32, "synthetic_samples": 80, "student_resolution": 16}
    train(Config(out=str(out), model=model, **keys))  # type: ignore[arg-type]
    rc, _, err = run_cli(["export", str(out), "--format", "onnx", "--quantize", "int8", "--calibration-images",
                          "16", "--no-bench"], capsys)
    assert rc == 0, err
    entries = json.loads((out / "export" / "export.json").read_text())["models"]
    summary = json.loads((out / "summary.json").read_text())
    fp32 = next(e for e in entries if e["precision"] == "fp32")
    assert fp32["parity"]["worst_relative_gap"] <= 1e-4
    assert fp32["test"]["top1"] == pytest.approx(summary["models"]["student"]["test"]["top1"], abs=1e-9)
    assert {e["precision"] for e in entries} == {"fp32", "int8"}
    with torch.no_grad():
        from distillistic import load_student

        module = load_student(out)
        assert module(torch.zeros(2, 1, 50, 40, dtype=torch.uint8)).shape == (2, 10)


def test_report_shows_exported_students(run: Path, tmp_path: Path) -> None:
    """``distillistic report`` gains an "Exported students" section from the runs' ``export.json`` (and none
    without one)."""
    from distillistic.experiments.report import write_report

    plain = (write_report([run], tmp_path / "r0") / "report.md").read_text()
    assert "## Exported students" not in plain
    entry = {"name": "student", "folder": "", "precision": "int8", "file": "x.int8.onnx", "bytes": 2_500_000,
             "test": {"top1": 0.9425, "ece": 0.0312, "nll": 0.2101},
             "vs_fp32": {"top1_agreement": 0.995}, "bench": {"latency_ms_median": 0.125, "latency_ms_p90": 0.25,
                                                             "throughput_images_per_s": 12345.6, "threads": 1}}
    (run / "export").mkdir(exist_ok=True)
    (run / "export" / "export.json").write_text(json.dumps({"models": [entry]}))
    try:
        text = (write_report([run], tmp_path / "r1") / "report.md").read_text()
    finally:
        (run / "export" / "export.json").unlink()
    assert "## Exported students" in text
    assert ("| student | int8 | 94.25 % | 3.12 % | 0.2101 | top-1 agrees 99.50 % | 2.500 | 0.125 / 0.250 | 12346 "
            "| 1 |") in text
