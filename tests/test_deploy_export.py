"""ONNX and int8 exports of a run's students (``distillistic export RUN --format onnx``): the graph takes uint8
images with the run's preprocessing inside, its logits match the PyTorch student's on the test split (checked
by ONNX Runtime at export), its test top-1 is the run's own, and bad inputs get one line.

Tests that run ONNX Runtime skip without the optional extra ``deploy``; the preprocessing graph is checked
without it too.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from _util import run_cli
from distillistic import Config, train
from distillistic import config as config_mod
from distillistic.data.loader import build_data
from distillistic.deploy.evaluate import reference_logits
from distillistic.deploy.graph import Preprocessed
from distillistic.deploy.students import load_student, run_students
from distillistic.errors import UserError
from distillistic.training import setup

pytestmark = pytest.mark.e2e  # every test trains a run or exports one (seconds)
HAVE_DEPLOY = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))
needs_deploy = pytest.mark.skipif(not HAVE_DEPLOY, reason="the optional extra 'deploy' (onnx, onnxruntime, "
                                                          "onnxscript) is not installed: pip install '.[deploy]'")
TINY = {"dataset": "synthetic", "synthetic_samples": 120, "image_size": 8, "epochs": 1, "batch_size": 16,
        "device": "cpu", "tensorboard": False, "progress": False, "num_workers": 0}


def _run(root: Path, name: str, **keys: object) -> Path:
    out = root / name
    train(Config(out=str(out), **{**TINY, **keys}))  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTILLISTIC_CACHE", str(root / "cache"))
        return {"cnn": _run(root, "cnn", model="cnn"),
                # a cohort of 2 with an EMA copy of each (PCL), read at 6 px from 8 px data (cross-quality view)
                "pcl": _run(root, "pcl", algo="pcl", students=2, model="mlp", student_resolution=6),
                "ban": _run(root, "ban", algo="ban", generations=2, model="mlp", allow_weak_teacher=True)}


def _test_logits(run: Path) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    cfg = setup.resolve(config_mod.load(run / "config.yaml"))
    bundle = build_data(cfg)
    test = bundle.splits["test"]
    images = test.images  # type: ignore[union-attr]
    students = run_students(run)
    refs = [reference_logits(s.module, test, bundle.info, cfg)[0] for s in students]
    with torch.no_grad():
        graphs = [s.module(images).double() for s in students]
    return refs, graphs, test.labels


@pytest.mark.parametrize("name", ["cnn", "pcl"])
def test_the_graph_reproduces_the_runs_evaluation(name: str, runs: dict[str, Path]) -> None:
    """Preprocessed (uint8 in) gives the logits of the run's own evaluation path, and its test top-1 is the
    summary's, for every student and EMA copy (no ONNX needed)."""
    refs, graphs, labels = _test_logits(runs[name])
    summary = json.loads((runs[name] / "summary.json").read_text())
    names = [s.name for s in run_students(runs[name])]
    assert len(names) == (1 if name == "cnn" else 4)
    for student, ref, got in zip(names, refs, graphs):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        top1 = float((got.argmax(1) == labels).double().mean())
        assert top1 == pytest.approx(summary["models"][student]["test"]["top1"], abs=1e-9), student


def test_load_student_from_a_run_and_a_safetensors_export(runs: dict[str, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run = runs["pcl"]
    summary = json.loads((run / "summary.json").read_text())
    best = load_student(run)
    assert isinstance(best, Preprocessed)
    assert best.class_names == tuple(summary["class_names"]) == tuple(str(i) for i in range(10))
    x = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    rc, _, err = run_cli(["export", str(run), "--out", str(run / "st")], capsys)
    assert rc == 0, err
    for name in ("student1", "student0_ema"):
        from_file, from_run = load_student(run / "st" / f"{name}.safetensors"), load_student(run, name)
        torch.testing.assert_close(from_file(x), from_run(x), rtol=0, atol=0)
    assert torch.equal(load_student(run, summary["best_student"])(x), best(x))
    with pytest.raises(UserError, match="has no model 'student7'; it has student0, student0_ema"):
        load_student(run, "student7")
    with pytest.raises(UserError, match=r"neither a run directory nor a \.safetensors export"):
        load_student(run / "config.yaml")


def test_without_the_extra_the_export_says_what_to_install(runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n.startswith("onnx") else real(n, *a))
    rc, _, err = run_cli(["export", str(runs["cnn"]), "--format", "onnx"], capsys)
    assert (rc, err) == (2, ["distillistic: error: export --format onnx needs onnx, onnxruntime, onnxscript, the "
                             "optional extra 'deploy': pip install 'distillistic[deploy]'"])


@pytest.mark.e2e
@needs_deploy
def test_onnx_and_int8_exports_of_a_cohort_with_ema_copies(runs: dict[str, Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    run = runs["pcl"]
    rc, out, err = run_cli(["export", str(run), "--format", "onnx", "--quantize", "int8", "--no-bench",
                            "--calibration-images", "32"], capsys)
    assert rc == 0, err
    summary = json.loads((run / "summary.json").read_text())
    manifest = json.loads((run / "export" / "export.json").read_text())
    entries = {(e["name"], e["precision"]): e for e in manifest["models"]}
    assert sorted(entries) == sorted((n, p) for n in ("student0", "student1", "student0_ema", "student1_ema")
                                     for p in ("fp32", "int8"))
    for name in ("student0", "student1", "student0_ema", "student1_ema"):
        fp32, int8 = entries[name, "fp32"], entries[name, "int8"]
        assert fp32["parity"]["worst_relative_gap"] <= 1e-4
        assert fp32["parity"]["top1_differs"] == 0
        assert fp32["test"]["top1"] == pytest.approx(summary["models"][name]["test"]["top1"], abs=1e-9)
        assert fp32["test"]["n"] == int8["test"]["n"] == summary_n(run)
        assert int8["quantization"]["calibration_images"] == 32
        assert int8["bytes"] < fp32["bytes"]
        agree = int8["vs_fp32"]["top1_agreement"]
        assert 0 <= agree <= 1
        assert int8["vs_fp32"]["delta_ece"] == pytest.approx(int8["test"]["ece"] - fp32["test"]["ece"])
        model = onnx.load(fp32["file"])
        props = {p.key: p.value for p in model.metadata_props}
        assert json.loads(props["class_names"]) == summary["class_names"]
        assert props["input_size"] == "8"
        assert props["precision"] == "fp32"
        assert len(props["config_sha256"]) == 64
        assert {p.key: p.value for p in onnx.load(int8["file"]).metadata_props}["precision"] == "int8"
    assert "student0_ema" in out
    assert "top-1 agrees" in out
    rc, _, err = run_cli(["export", str(run), "--format", "onnx"], capsys)
    assert (rc, len(err)) == (2, 1)
    assert err[0].endswith("student0.onnx' already exists; pass --overwrite to replace it, or choose another --out")


def summary_n(run: Path) -> int:
    return int(json.loads((run / "manifest.json").read_text())["dataset"]["sizes"]["test"])


@pytest.mark.e2e
@needs_deploy
def test_a_graph_with_a_dynamic_batch_and_any_image_size_runs_in_onnx_runtime(runs: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    from distillistic.deploy.onnx_export import export_onnx, session

    module = load_student(runs["cnn"])
    export_onnx(module, tmp_path / "m.onnx", {"k": "v"}, "cnn")
    sess = session(tmp_path / "m.onnx")
    for shape in [(1, 1, 8, 8), (5, 1, 8, 8), (2, 1, 20, 13)]:
        x = torch.randint(0, 256, shape, dtype=torch.uint8)
        got = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(got, module(x), rtol=1e-4, atol=1e-4)


@pytest.mark.e2e
@needs_deploy
def test_a_parity_gap_fails_the_export_naming_the_sample(runs: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from distillistic.deploy import pipeline

    real = pipeline.session_logits

    def off_by_a_bit(*args: object) -> torch.Tensor:
        z = real(*args)  # type: ignore[arg-type]
        z[7, 0] += 0.05 * max(1.0, float(z[7].abs().max()))
        return z

    monkeypatch.setattr(pipeline, "session_logits", off_by_a_bit)
    rc, _, err = run_cli(["export", str(runs["cnn"]), "--format", "onnx", "--out", str(tmp_path / "e")], capsys)
    assert rc == 2
    assert len(err) == 1
    assert err[0].startswith("distillistic: error: export: the ONNX model of 'student' differs from the PyTorch "
                             "student on the test split: sample 7 has a logit gap of 5.00e-02 (relative; tolerance "
                             "1e-04), ")
    assert err[0].endswith(" top-1 decisions differ; nothing was exported")
    assert not (tmp_path / "e" / "student.onnx").exists()


class _Odd(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.distillistic_test.odd(x.flatten(1))


@pytest.mark.e2e
@needs_deploy
def test_an_operator_the_exporter_cannot_translate_is_named(tmp_path: Path) -> None:
    from distillistic.deploy.graph import Inputs
    from distillistic.deploy.onnx_export import export_onnx

    if not hasattr(torch.ops.distillistic_test, "odd"):
        @torch.library.custom_op("distillistic_test::odd", mutates_args=())
        def odd(x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        @odd.register_fake
        def _(x: torch.Tensor) -> torch.Tensor:
            return torch.empty_like(x)

    module = Preprocessed(_Odd(), Inputs(4, 1, (0.5,), (0.5,)), ("a",))
    with pytest.raises(UserError) as info:
        export_onnx(module, tmp_path / "odd.onnx", {}, "student")
    message = str(info.value)
    assert message.startswith("export: the ONNX exporter cannot trace 'student': operator ")
    assert "distillistic_test" in message
    assert "odd" in message
    assert "\n" not in message
    assert not (tmp_path / "odd.onnx").exists()


@needs_deploy
def test_every_generation_of_born_again_networks_exports(runs: dict[str, Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    run = runs["ban"]
    rc, out, err = run_cli(["export", str(run), "--format", "onnx", "--no-bench"], capsys)
    assert rc == 0, err
    assert out.strip().endswith(f"written: {run / 'export' / 'export.json'}")
    entries = json.loads((run / "export" / "export.json").read_text())["models"]
    assert [(e["folder"], e["name"]) for e in entries] == [("gen1", "student"), ("gen2", "student")]
    for e in entries:
        summary = json.loads((run / e["folder"] / "summary.json").read_text())
        assert Path(e["file"]) == run / "export" / e["folder"] / "student.onnx"
        assert e["parity"]["worst_relative_gap"] <= 1e-4
        assert e["test"]["top1"] == pytest.approx(summary["models"]["student"]["test"]["top1"], abs=1e-9)
