"""``per_method`` in a tune: keys fixed for one method only (a cohort's size, a feature method's hint stage, a
self-taught method's own teacher), reaching that method's trials and re-training and no other method."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from _util import run_cli
from distillistic.errors import UserError
from distillistic.experiments.tune import check_per_method, tune

optuna = pytest.importorskip("optuna")

TINY = {"dataset": "synthetic", "synthetic_samples": 200, "model": "mlp", "epochs": 1, "batch_size": 16,
        "threads": 1, "num_workers": 0, "tensorboard": False, "progress": False}
FLAGS = ["--dataset", "synthetic", "--synthetic-samples", "200", "--model", "mlp", "--epochs", "1",
         "--batch-size", "16", "--threads", "1", "--num-workers", "0", "--no-tensorboard", "--no-progress"]


@pytest.mark.parametrize(("per_method", "says"), [
    ({"dmll": {"students": 2}}, "unknown algorithm 'dmll' (did you mean 'dml'?)"),
    ({"dml": 2}, "'dml' must map keys to values"),
    ({"dml": {"hint_stage": "embedding"}}, "'dml' does not read 'hint_stage'"),
    ({"dml": {"seed": 3}}, "'dml' sets 'seed', which a tune decides itself"),
    ({"dml": {"out": "x"}}, "'dml' sets 'out', which a tune decides itself"),
    ({"dml": {"stdents": 2}}, "unknown config key 'stdents'"),
    ([("dml", {"students": 2})], "per_method must map a method to its fixed keys"),
])
def test_a_bad_per_method_entry_is_refused_in_one_line(per_method: object, says: str) -> None:
    with pytest.raises(UserError) as e:
        check_per_method(per_method, TINY)  # type: ignore[arg-type]
    assert says in str(e.value)
    assert "\n" not in str(e.value)


def test_per_method_keys_are_normalised_and_a_method_outside_algo_is_allowed() -> None:
    assert check_per_method({"dml": {"students": 2}, "fitnet": {"hint-stage": "embedding"}}, TINY) == {
        "dml": {"students": 2}, "fitnet": {"hint_stage": "embedding"}}


@pytest.mark.e2e
def test_a_per_method_key_reaches_that_method_only_and_is_not_searched(tmp_path: Path) -> None:
    out = tmp_path / "t"
    result = tune(["baseline", "dml", "kdcl"], 1, out, TINY, seeds=1,
                  per_method={"dml": {"students": 4, "temperature": 3.0}, "fitnet": {"hint_stage": "embedding"}})
    assert "temperature" not in result.methods["dml"]["best_params"]  # fixed for dml ...
    assert "temperature" in result.methods["kdcl"]["best_params"]  # ... and still searched for kdcl
    runs = {"baseline": 1, "dml": 4, "kdcl": 2}  # the students of each run (kdcl: its default, 2)
    for method, students in runs.items():
        for folder in [out / ".trials" / method / "trial-0000", out / f"{method},seed=43"]:
            config = yaml.safe_load((folder / "config.yaml").read_text())
            assert config["students"] == students, (folder, config["students"])
            if method == "dml":
                assert config["temperature"] == 3.0
    assert not (out / ".trials" / "fitnet").exists()  # not in --algo: ignored


def test_the_cli_reads_per_method_from_the_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump({"per_method": {"dml": {"hint_stage": "embedding"}}}))
    out = tmp_path / "t"
    rc, _, err = run_cli(["tune", str(config), "--algo", "dml", "--trials", "1", *FLAGS, "--out", str(out)], capsys)
    assert rc == 2
    assert err == ["distillistic: error: tune: per_method: 'dml' does not read 'hint_stage' (it would be ignored); "
                   "remove it"]
    assert not out.exists()


@pytest.mark.parametrize(("base", "algos", "says"), [
    ({"students": 2}, ["baseline", "ban"], "'students' = 2 is not allowed: 1 for ban"),
    ({"teacher": "cnn", "teacher_weights": "random"}, ["kd", "tfkd_self"], "tfkd_self is taught by the student's own"),
])
def test_a_key_one_method_refuses_stops_the_tune_before_any_study(tmp_path: Path, base: dict[str, object],
                                                                  algos: list[str], says: str) -> None:
    out = tmp_path / "t"
    with pytest.raises(UserError, match=says):
        tune(algos, 1, out, {**TINY, **base}, seeds=0)
    assert not out.exists()  # no study, no trial of the methods listed before it
