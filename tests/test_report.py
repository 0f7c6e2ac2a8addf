"""Reports: aggregation of hand-made run directories with known means and stds, labels, axes, figures."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
from matplotlib.image import imread

from distillistic import config as config_mod
from distillistic.cli import main
from distillistic.config import Config
from distillistic.errors import UserError
from distillistic.experiments.plots import _geometric, swept_axes
from distillistic.experiments.report import (
    cell_rows,
    find_runs,
    format_table,
    group_runs,
    mean_std,
    minimal_labels,
    summarize_runs,
    write_report,
)
from distillistic.training import setup

BINS = 15
PNG = b"\x89PNG\r\n\x1a\n"


def _metrics(top1: float, ece: float, reliability: bool = True) -> dict[str, Any]:
    m: dict[str, Any] = {"top1": top1, "top5": 1.0, "ece": ece, "nll": 1.0 - top1, "entropy": 2 * ece,
                         "brier": 0.5 * (1 - top1), "n": 100}
    if reliability:  # every sample in the bin (0.8, 0.867] with accuracy top1
        count = [0] * BINS
        count[12] = 100
        m["reliability"] = {"count": count, "accuracy": [top1 if c else 0.0 for c in count],
                            "confidence": [0.83 if c else 0.0 for c in count]}
    return m


def make_run(folder: Path, seed: int, top1: float, ece: float = 0.05, last_top1: float | None = None,
             seconds: float = 10.0, students: int = 1, status: str = "completed", **settings: Any) -> Path:
    """A run directory as ``distillistic train`` writes it, with chosen test metrics (and 2 epochs of history)."""
    folder.mkdir(parents=True)
    cfg = setup.resolve(Config(dataset="synthetic", model="cnn", epochs=2, seed=seed, out=str(folder),
                                    **settings))
    config_mod.save(cfg, folder / "config.yaml")
    last = last_top1 if last_top1 is not None else top1
    names = ["student"] if students == 1 else [f"student{i}" for i in range(students)]
    models = {n: {"test": _metrics(top1, ece), "test_last": _metrics(last, ece), "val_best": {"epoch": 2}}
              for n in names}
    summary: dict[str, Any] = {"status": status, "algo": cfg.algo, "models": models, "train_seconds": seconds,
                               "train_images_per_second": 1000.0 / seconds}
    if students > 1:
        summary["cohort_mean"] = {"test": _metrics(top1, ece, False), "test_last": _metrics(last, ece, False)}
        models["ensemble"] = {"test": _metrics(top1 + 0.01, ece), "test_last": _metrics(last + 0.01, ece)}
    (folder / "summary.json").write_text(json.dumps(summary))
    rows = [{"model": n, "split": "val", "epoch": e, "top1": top1 - 0.1 * (2 - e), "ece": ece} for e in (1, 2)
            for n in names]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_mean_std_is_the_sample_std() -> None:
    mean, std, n = mean_std([0.8, 0.9, 1.0])
    assert (mean, n) == (pytest.approx(0.9), 3)
    assert std == pytest.approx(0.1)  # sqrt(((0.1)^2 + 0 + (0.1)^2) / (3 - 1))
    mean, std, n = mean_std([0.7, None, float("nan")])
    assert (mean, n) == (0.7, 1)
    assert math.isnan(std)
    assert mean_std([])[2] == 0


def test_cells_aggregate_over_seeds_with_known_means_and_stds(tmp_path: Path) -> None:
    for seed, top1, last, secs in ((0, 0.80, 0.70, 10.0), (1, 0.90, 0.75, 20.0), (2, 1.00, 0.80, 30.0)):
        make_run(tmp_path / f"base{seed}", seed, top1, last_top1=last, seconds=secs, algo="baseline")
    for seed, top1 in ((0, 0.6), (1, 0.7)):
        make_run(tmp_path / f"dml{seed}", seed, top1, ece=0.1 * (seed + 1), students=3, algo="dml")
    runs, skipped = find_runs([tmp_path])
    assert len(runs) == 5
    assert skipped == []
    groups = group_runs(runs)
    assert [g.label for g in groups] == ["algo=baseline", "algo=dml"]
    rows = {(r["label"], r["model"]): r for r in cell_rows(groups)}
    assert set(rows) == {("algo=baseline", "student"), ("algo=dml", "cohort mean"), ("algo=dml", "ensemble")}
    base = rows[("algo=baseline", "student")]
    assert base["n"] == 3
    assert base["seeds"] == "0,1,2"
    assert base["test_top1_mean"] == pytest.approx(0.9)
    assert base["test_top1_std"] == pytest.approx(0.1)
    assert base["test_last_top1_mean"] == pytest.approx(0.75)
    assert base["test_last_top1_std"] == pytest.approx(0.05)
    assert base["test_nll_mean"] == pytest.approx(0.1)
    assert base["train_seconds_mean"] == pytest.approx(20.0)
    assert base["train_seconds_std"] == pytest.approx(10.0)
    assert base["images_per_second_mean"] == pytest.approx((100 + 50 + 1000 / 30) / 3)
    assert base["best_epoch_mean"] == 2.0
    cohort, ensemble = rows[("algo=dml", "cohort mean")], rows[("algo=dml", "ensemble")]
    assert cohort["n"] == 2
    assert cohort["test_top1_mean"] == pytest.approx(0.65)
    assert cohort["test_top1_std"] == pytest.approx(math.sqrt(0.005))
    assert cohort["test_ece_mean"] == pytest.approx(0.15)
    assert ensemble["test_top1_mean"] == pytest.approx(0.66)
    assert base["algo"] == "baseline"
    assert cohort["students"] == 3


def test_grouping_ignores_seeds_and_machine_keys_but_not_settings(tmp_path: Path) -> None:
    make_run(tmp_path / "a", 0, 0.9, algo="kd", teacher="cnn", temperature=4.0, device="cpu", threads=1)
    make_run(tmp_path / "b", 1, 0.8, algo="kd", teacher="cnn", temperature=4.0, cache_dir="/elsewhere")
    make_run(tmp_path / "c", 0, 0.7, algo="kd", teacher="cnn", temperature=8.0)
    groups = group_runs(find_runs([tmp_path])[0])
    assert [(g.label, len(g.runs)) for g in groups] == [("temperature=4", 2), ("temperature=8", 1)]


def test_labels_name_only_what_tells_cells_apart() -> None:
    fashion = [{"algo": "baseline", "virtual_smooth": False, "temperature": 1.0},
               {"algo": "kd", "virtual_smooth": False, "temperature": 20.0},
               {"algo": "tfkd", "virtual_smooth": True, "temperature": 20.0},
               {"algo": "tfkd", "virtual_smooth": False, "temperature": 1.0}]
    assert minimal_labels(fashion) == ["algo=baseline", "algo=kd", "algo=tfkd, virtual_smooth=true",
                                       "algo=tfkd, virtual_smooth=false"]
    sizes = [{"algo": a, "student_resolution": r, "batch_size": 1024 if r < 120 else 512}
             for a in ("kd", "dml") for r in (42, 84, 168)]
    labels = minimal_labels(sizes)
    assert labels[0] == "algo=kd, student_resolution=42"
    assert len(set(labels)) == 6
    assert minimal_labels([{"algo": "kd"}]) == ["algo=kd"]


def test_swept_axes_need_a_line_with_two_points(tmp_path: Path) -> None:
    for algo, extra in (("baseline", {}), ("kd", {"teacher": "cnn"})):
        for res, batch in ((4, 64), (8, 64), (16, 32)):
            make_run(tmp_path / f"{algo}{res}", 0, 0.5 + res / 100, algo=algo, student_resolution=res,
                     batch_size=batch, **extra)
    groups = group_runs(find_runs([tmp_path])[0])
    # batch_size follows the student size (tied), temperature and teacher follow the algorithm: one axis
    assert swept_axes(groups) == ["student_resolution"]
    fashion = tmp_path / "fashion"
    make_run(fashion / "b", 0, 0.9, algo="baseline")
    make_run(fashion / "k", 0, 0.9, algo="kd", teacher="cnn")
    assert swept_axes(group_runs(find_runs([fashion])[0])) == []  # temperature differs, but per algorithm


def test_log_axis_only_for_ratio_spaced_values() -> None:
    assert _geometric([7, 14, 28])
    assert _geometric([42, 84, 168])
    assert _geometric([1, 4, 20])
    assert not _geometric([0.1, 0.5, 0.9])
    assert not _geometric([2, 3, 4, 5])
    assert not _geometric([7, 14])


def _is_png(path: Path) -> bool:
    image = imread(path)
    return path.read_bytes()[:8] == PNG and image.shape[0] > 200 and image.shape[1] > 200


@pytest.mark.e2e
def test_report_writes_markdown_csv_and_every_figure(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        for res in (4, 8, 16):
            make_run(sweep / f"b,{res},{seed}", seed, 0.5 + res / 40 + seed / 100, student_resolution=res)
            make_run(sweep / f"k,{res},{seed}", seed, 0.4 + res / 40, algo="kd", teacher="cnn",
                     student_resolution=res)
            make_run(sweep / f"d,{res},{seed}", seed, 0.45 + res / 40, algo="dml", students=2,
                     student_resolution=res)
    make_run(sweep / "stopped", 3, 0.1, status="interrupted")
    out = write_report([sweep])
    assert out == sweep / "report"
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["learning_curves.png", "reliability.png", "vs_student_resolution.png"]
    assert all(_is_png(out / "figures" / f) for f in figures)
    text = (out / "report.md").read_text()
    assert "18 completed runs in 9 cells" in text
    assert "| algo=baseline, student_resolution=4 | student | 2 | 60.50 ± 0.71 |" in text
    assert "| algo=dml, student_resolution=16 | ensemble | 2 |" in text
    assert "Not included (1)" in text
    assert "status 'interrupted'" in text
    assert "![Against the student input size](figures/vs_student_resolution.png)" in text
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 3 + 3  # 9 cells, the 3 DML cells twice (cohort mean, ensemble)
    row = next(r for r in rows if r["label"] == "algo=baseline, student_resolution=4")
    assert float(row["test_top1_mean"]) == pytest.approx(0.605)
    assert float(row["test_top1_std"]) == pytest.approx(math.sqrt(0.00005))
    assert row["student_resolution"] == "4"
    assert row["seeds"] == "0,1"
    # a second report replaces the figures, a different --out is honoured
    assert write_report([sweep], tmp_path / "elsewhere") == tmp_path / "elsewhere"
    assert (tmp_path / "elsewhere" / "figures" / "reliability.png").is_file()


def test_report_of_single_runs_without_axes(tmp_path: Path) -> None:
    make_run(tmp_path / "runs" / "a", 0, 0.9)
    make_run(tmp_path / "runs" / "b", 0, 0.8, algo="tfkd", virtual_smooth=True)
    out = write_report([tmp_path / "runs" / "a", tmp_path / "runs" / "b"], tmp_path / "rep")
    names = sorted(p.name for p in (out / "figures").iterdir())
    assert names == ["learning_curves.png", "reliability.png"]
    assert all(_is_png(out / "figures" / n) for n in names)
    assert "| algo=baseline | student | 1 | 90.00 |" in (out / "report.md").read_text()  # n = 1: no ± std


def test_bad_report_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no completed run directories"):
        write_report([tmp_path / "empty"])
    with pytest.raises(UserError, match="is not a directory"):
        write_report([tmp_path / "absent"])
    make_run(tmp_path / "only" / "r", 0, 0.5, status="interrupted")
    with pytest.raises(UserError, match="1 run folders were not completed"):
        write_report([tmp_path / "only"])
    make_run(tmp_path / "a", 0, 0.5)
    make_run(tmp_path / "b", 0, 0.5)
    with pytest.raises(UserError, match="pass --out REPORT_DIR"):
        write_report([tmp_path / "a", tmp_path / "b"])
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no completed run directories" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "report").exists()  # nothing written for bad input


def test_config_files_are_read_by_libyaml_into_what_safe_load_gives() -> None:
    """The report reads each run's config.yaml with libyaml's safe loader (where PyYAML has it): the same objects
    as ``yaml.safe_load``, and a Python object tag is refused as before."""
    import yaml

    from distillistic.experiments.report import SAFE_LOADER

    assert SAFE_LOADER is (yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader)
    text = yaml.safe_dump(setup.resolve(Config(dataset="synthetic", algo="kd", teacher="cnn,mlp", lr=3e-3)).to_dict())
    text += "odd: [yes, off, 0x1F, 1_000, .inf, ~, '3e-3', 2026-12-07, {a: [1, 2.5]}]\n"
    loaded = yaml.load(text, Loader=SAFE_LOADER)
    assert loaded == yaml.safe_load(text)
    assert loaded["lr"] == 3e-3
    assert loaded["odd"][:7] == [True, False, 31, 1000, math.inf, None, "3e-3"]
    with pytest.raises(yaml.YAMLError):
        yaml.load("!!python/object/apply:os.system ['true']", Loader=SAFE_LOADER)


def test_demo_table_api_still_works(tmp_path: Path) -> None:
    runs = [make_run(tmp_path / f"r{s}", s, top1) for s, top1 in ((0, 0.8), (1, 0.9))]
    rows = summarize_runs({"baseline": runs})
    assert rows[0]["n"] == 2
    assert rows[0]["top1"] == pytest.approx(0.85)
    assert rows[0]["top1_std"] == pytest.approx(math.sqrt(0.005))
    assert "| baseline | 2 | 85.00 ± 7.07 |" in format_table(rows)


@pytest.mark.parametrize("damage", ["summary-not-json", "summary-list", "no-models", "models-not-dicts",
                                    "top1-text", "config-broken", "config-no-algo", "seed-text", "summary-deep",
                                    "summary-dir", "config-missing", "config-huge"])
def test_one_malformed_run_folder_never_loses_the_good_runs(damage: str, tmp_path: Path) -> None:
    """Every malformed case: the good run is reported, the bad folder is skipped and named with its reason."""
    make_run(tmp_path / "sweep" / "good", 0, 0.5)
    bad = tmp_path / "sweep" / "bad"
    make_run(bad, 1, 0.7)
    summary = json.loads((bad / "summary.json").read_text())
    edits = {"summary-not-json": lambda: (bad / "summary.json").write_text("{not json"),
             "summary-list": lambda: (bad / "summary.json").write_text("[1, 2]"),
             "no-models": lambda: (bad / "summary.json").write_text(json.dumps({**summary, "models": None})),
             "models-not-dicts": lambda: (bad / "summary.json").write_text(json.dumps({**summary, "models": {"s": 3}})),
             "top1-text": lambda: (bad / "summary.json").write_text(json.dumps(
                 {**summary, "models": {"student": {"test": {"top1": "high", "ece": 0.1}}}})),
             "config-broken": lambda: (bad / "config.yaml").write_text("algo: [\n"),
             "config-no-algo": lambda: (bad / "config.yaml").write_text("seed: 1\n"),
             "seed-text": lambda: (bad / "config.yaml").write_text("algo: baseline\nseed: one\n"),
             "summary-deep": lambda: (bad / "summary.json").write_text("[" * 100_000 + "]" * 100_000),
             "summary-dir": lambda: ((bad / "summary.json").unlink(), (bad / "summary.json").mkdir()),
             "config-missing": lambda: (bad / "config.yaml").unlink(),
             "config-huge": lambda: (bad / "config.yaml").write_text(  # valid YAML, above a config's 1 MiB
                 (bad / "config.yaml").read_text() + "pad: " + "x" * (1 << 20) + "\n")}
    edits[damage]()
    out = write_report([tmp_path / "sweep"], tmp_path / "report")
    text = (out / "report.md").read_text()
    assert "| algo=baseline | student | 1 | 50.00 |" in text  # the good run (n = 1)
    assert f"`{bad}`" in text  # the skipped folder, named
    if damage == "config-huge":
        assert "larger than 1 MiB" in text
