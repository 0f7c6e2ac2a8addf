"""``distillistic tune``: search spaces from the specs, the objective on validation, an equal budget, bad inputs,
a re-training laid out as a sweep (``report`` reads it), a resume after kill -9 and two workers on one study."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

import _forked_cli as forked_cli
from _util import run_cli, snapshot
from distillistic.errors import UserError
from distillistic.experiments import tune_space
from distillistic.experiments.tune import tune
from distillistic.experiments.tune_study import epoch_value, final_value
from distillistic.methods.spec import Space, log_uniform

optuna = pytest.importorskip("optuna")

TINY = {"dataset": "synthetic", "synthetic_samples": 200, "model": "mlp", "teacher": "mlp", "teacher_weights": "random",
        "epochs": 1, "batch_size": 16, "threads": 1, "num_workers": 0, "tensorboard": False, "progress": False}
PLAIN = {k: v for k, v in TINY.items() if not k.startswith("teacher")}  # for a baseline alone
FLAGS = ["--dataset", "synthetic", "--synthetic-samples", "200", "--model", "mlp", "--epochs", "1",
         "--batch-size", "16", "--threads", "1", "--num-workers", "0", "--no-tensorboard", "--no-progress"]


def _space(method: str, optimizer: str = "adamw", fixed: tuple[str, ...] = ()) -> dict[str, Space]:
    return tune_space.search_space(tune_space.method_spec(method), optimizer, set(fixed))


def test_each_method_searches_its_own_parameters_and_the_common_keys_it_reads() -> None:
    assert list(_space("kd")) == ["logit_standardize", "lr", "weight_decay", "alpha", "temperature"]
    dkd = _space("dkd")  # a sum of terms: no alpha; its own weights instead
    assert set(dkd) == {"dkd_alpha", "dkd_beta", "logit_standardize", "lr", "weight_decay", "temperature"}
    assert dkd["dkd_beta"] == log_uniform(0.5, 16.0)  # the spec's own space
    assert set(_space("dml")) == {"logit_standardize", "lr", "weight_decay", "alpha", "temperature"}
    assert set(_space("baseline")) == {"lr", "weight_decay"}
    assert _space("baseline", "sgd")["lr"] == log_uniform(1e-2, 1.0)
    assert set(_space("kd", fixed=("alpha", "lr", "epochs"))) == {"logit_standardize", "weight_decay", "temperature"}


def test_a_method_left_with_nothing_to_tune_or_a_malformed_space_is_refused() -> None:
    with pytest.raises(UserError, match=r"'baseline' has nothing left to tune .* lr, weight_decay"):
        _space("baseline", fixed=("lr", "weight_decay"))
    for space, why in [(Space(2.0, 1.0), "is empty"), (Space(0.0, 1.0, scale="log"), "log scale"),
                       (Space(), "needs finite low and high bounds")]:
        with pytest.raises(UserError, match=why):
            tune_space.check_space("m", "k", space)
    with pytest.raises(UserError, match="unknown algorithm 'nope'"):
        tune_space.method_spec("nope")


def test_suggest_draws_every_key_inside_its_space() -> None:
    space = {"a": log_uniform(1e-4, 1e-2), "n": Space(2, 4, integer=True), "b": Space(choices=(False, True))}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        values = tune_space.suggest(study.ask(), space)
        assert 1e-4 <= values["a"] <= 1e-2
        assert values["n"] in (2, 3, 4)
        assert isinstance(values["n"], int)
        assert values["b"] in (False, True)
    assert tune_space.describe(space) == {"a": "log-uniform [0.0001, 0.01]", "n": "integers [2, 4]",
                                          "b": "one of false, true"}


def test_the_objective_is_the_students_validation_mean() -> None:
    rows = [{"model": "student0", "split": "train", "top1": 0.1}, {"model": "student0", "split": "val", "top1": 0.5},
            {"model": "student1", "split": "val", "top1": 0.7}, {"model": "ensemble", "split": "val", "top1": 0.9},
            {"model": "cohort", "split": "val", "top1_mean": 0.6}]
    assert epoch_value(rows, "top1") == pytest.approx(0.6)
    assert epoch_value(rows, "ece") is None
    summary = {"models": {"student0": {"val_best": {"nll": 0.3}, "test": {"nll": 9.0}},
                          "student1": {"val_best": {"nll": 0.5}, "test": {"nll": 9.0}},
                          "ensemble": {"val_best": {"nll": 0.1}}}}
    assert final_value(summary, "nll") == pytest.approx(0.4)
    assert final_value({"models": {"student": {"val_best": {"top1": float("nan")}}}}, "top1") is None


@pytest.mark.parametrize(("args", "says"), [
    (["--algo", "kd", "--trials", "0"], "--trials 0: pass a whole number >= 1"),
    (["--algo", "kd,nope", "--trials", "2"], "unknown algorithm 'nope'"),
    (["--algo", "kd,kd", "--trials", "2"], "lists 'kd' twice"),
    (["--algo", "baseline", "--trials", "2", "--lr", "0.01", "--weight-decay", "0"], "nothing left to tune"),
    (["--algo", "kd", "--trials", "2", "--objective", "acc"], "--objective 'acc'"),
    (["--algo", "kd", "--trials", "2", "--seeds", "-1"], "--seeds -1"),
    (["--algo", "kd", "--trials", "2", "--storage", "sqlite:////no/such/folder/t.db"], "cannot be opened"),
    (["--algo", "kd", "--trials", "2", "--storage", "nosuchdb://x"], "cannot be opened"),
    (["--algo", "baseline", "--trials", "2", "--temperature", "4"], "read by no cell's algorithm"),
])
def test_bad_input_is_one_line_and_exit_2_and_loses_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           args: list[str], says: str) -> None:
    out = tmp_path / "t"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    rc, _, err = run_cli(["tune", *args, *FLAGS, "--out", str(out)], capsys)
    assert rc == 2
    assert len(err) == 1
    assert says in err[0]
    assert snapshot(out) == before


def _study(out: Path, method: str) -> Any:
    return optuna.load_study(study_name=method, storage=f"sqlite:///{out / 'tune.db'}")


@pytest.mark.e2e
def test_a_tune_judges_on_val_retrains_on_shared_seeds_and_report_reads_it(tmp_path: Path) -> None:
    out = tmp_path / "t"
    result = tune(["kd", "dml"], 2, out, TINY, seeds=2)
    for method in ("kd", "dml"):
        trials = _study(out, method).trials
        assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
        for t in trials:  # the value is the students' mean val top-1 of that trial's own run, at its best epoch
            folder = out / ".trials" / method / f"trial-{t.number:04d}"
            summary = json.loads((folder / "summary.json").read_text())
            students = [m for name, m in summary["models"].items() if name.startswith("student")]
            assert len(students) == (3 if method == "dml" else 1)
            assert t.value == pytest.approx(sum(m["val_best"]["top1"] for m in students) / len(students))
            rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            val = [r["top1"] for r in rows if r["split"] == "val" and r["model"].startswith("student")]
            assert t.intermediate_values == {1: pytest.approx(sum(val) / len(val))}
            config = yaml.safe_load((folder / "config.yaml").read_text())
            assert all(config[k] == pytest.approx(v) for k, v in t.params.items())  # the draw reached the run
            assert not (folder / "checkpoints").exists()
    # the best config of each method, re-trained on the same seeds (none of them the tuning seed), as a sweep
    assert result.sweep is not None
    assert not result.sweep.failures
    for method in ("kd", "dml"):
        best = _study(out, method).best_params
        for seed in (43, 44):
            config = yaml.safe_load((out / f"{method},seed={seed}" / "config.yaml").read_text())
            assert config["seed"] == seed
            assert config["algo"] == method
            assert all(config[k] == pytest.approx(v) for k, v in best.items())
    record = json.loads((out / "tune.json").read_text())
    assert record["seeds"] == [43, 44]
    assert record["methods"]["kd"]["best_params"] == _study(out, "kd").best_params

    from distillistic.experiments.report import find_runs, group_runs, write_report

    runs, _ = find_runs([out])  # the trials (a hidden folder) are not cells
    groups = group_runs(runs)
    assert sorted((g.settings["algo"], g.seeds) for g in groups) == [("dml", "43,44"), ("kd", "43,44")]
    table = (write_report([out]) / "report.md").read_text()  # no baseline among them: no pairs, still a table
    assert "| kd | student | 2 |" in table
    assert "| dml | cohort mean | 2 |" in table

    # the same command again: nothing new runs, nothing is lost; another tune's settings are refused
    again = tune(["kd", "dml"], 2, out, TINY, seeds=2)
    assert again.sweep is not None
    assert len(again.sweep.with_status("skipped")) == 4
    assert [len(_study(out, m).trials) for m in ("kd", "dml")] == [2, 2]
    before = snapshot(out)
    with pytest.raises(UserError, match=r"study 'kd' .* is of another tune .*batch_size"):
        tune(["kd", "dml"], 2, out, {**TINY, "batch_size": 8}, seeds=2)
    assert snapshot(out) == before


def _cli(args: list[str], fault: str | None = None) -> forked_cli.Child:
    """``python -m distillistic tune ARGS`` started in a process of its own (forked from a server that imported
    torch once, tests/_forked_cli.py), with ``$DISTILLISTIC_FAULT`` set to ``fault``; not waited for."""
    return forked_cli.Child(["tune", *args], forked_cli.cli_env(fault, OMP_NUM_THREADS="1"))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_tune_killed_mid_trial_resumes_and_loses_no_finished_trial(tmp_path: Path) -> None:
    out = tmp_path / "t"
    args = ["--algo", "dml", "--trials", "3", "--seeds", "0", *FLAGS, "--out", str(out)]
    killed = _cli(args, "final:2")  # SIGKILL as trial 1 ends its training
    killed.wait(timeout=300)
    assert killed.returncode == -9
    first = _study(out, "dml").trials
    assert [t.state.name for t in first] == ["COMPLETE", "RUNNING"]
    resumed = _cli(args)
    err = resumed.wait(timeout=300).stderr
    assert resumed.returncode == 0, err
    assert "trial 1 was lost with its worker" in err
    trials = _study(out, "dml").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]  # 3 in the budget
    assert (trials[0].params, trials[0].value) == (first[0].params, first[0].value)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_workers_on_one_sqlite_file_split_the_trials_and_run_none_twice(tmp_path: Path) -> None:
    out = tmp_path / "t"
    args = ["--algo", "dml", "--trials", "4", "--seeds", "0", *FLAGS, "--out", str(out)]
    workers = [_cli(args), _cli(args)]
    errs = [w.wait(timeout=300).stderr for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errs
    trials = _study(out, "dml").trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4  # no surplus trial: exactly the budget
    ran = [{int(line.split("trial ")[1].split(":")[0]) for line in err.splitlines() if line.startswith("dml trial ")
            and "val top1" not in line} for err in errs]
    assert ran[0] | ran[1] == {0, 1, 2, 3}
    assert not ran[0] & ran[1]  # each trial ran in one worker only
    pids = {str(w.pid) for w in workers}
    assert {t.user_attrs["worker"].rpartition(":")[2] for t in trials} <= pids


@pytest.mark.e2e
@pytest.mark.own_teachers  # counts the teachers trained
def test_every_trial_and_retraining_distils_from_one_teacher_trained_first(tmp_path: Path) -> None:
    """A teacher trained first reads the run's lr and weight decay: tuned, they would train a teacher per trial."""
    out = tmp_path / "t"
    tune(["kd"], 2, out, {**TINY, "teacher_weights": "train", "teacher_epochs": 2}, seeds=1)
    cache = Path(os.environ["DISTILLISTIC_CACHE"]) / "teachers"
    trained = [p for p in cache.iterdir() if p.is_dir()]
    assert len(trained) == 1  # one teacher, with the fixed settings
    lrs = set()
    for folder in [*sorted((out / ".trials" / "kd").iterdir()), out / "kd,seed=43"]:
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["teacher_weights"] == str(trained[0])
        lrs.add(config["lr"])
    assert len(lrs) == 2  # the trials drew other learning rates (the re-training uses the best one)


@pytest.mark.e2e
def test_a_diverged_trial_uses_its_share_of_the_budget(tmp_path: Path) -> None:
    result = tune(["baseline"], 1, tmp_path / "t", {**PLAIN, "lr": 1e30}, seeds=0)  # weight decay is still tuned
    (trial,) = _study(tmp_path / "t", "baseline").trials
    assert trial.state.name == "FAIL"
    assert trial.user_attrs["counted"] is True
    assert "diverged" in trial.user_attrs["reason"]
    assert result.methods["baseline"]["trials"] == {"fail": 1}
    assert "best_params" not in result.methods["baseline"]


def test_trials_running_in_another_worker_are_waited_for_not_repeated(tmp_path: Path) -> None:
    out = tmp_path / "t"
    out.mkdir()
    study = optuna.create_study(study_name="baseline", storage=f"sqlite:///{out / 'tune.db'}", direction="maximize")
    elsewhere = study.ask()  # a live worker on another machine (no heartbeat yet: never stale)
    elsewhere.set_user_attr("worker", "another-host:1")
    result = tune(["baseline"], 1, out, PLAIN, seeds=2)
    assert result.waiting == {"baseline": 1}
    assert result.sweep is None  # the re-training waits for the budget to be spent
    assert [t.state.name for t in _study(out, "baseline").trials] == ["RUNNING"]


def test_a_trial_asked_beyond_the_budget_is_failed_unrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a server database two workers may both count N - 1 and ask: the later trial is failed, never run."""
    out = tmp_path / "t"
    real_ask = optuna.study.Study.ask

    def racing_ask(self: Any, *args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(optuna.study.Study, "ask", real_ask)
        other = real_ask(self)  # another worker asks between this one's count and its ask
        other.set_user_attr("worker", "another-host:1")
        return real_ask(self, *args, **kwargs)

    monkeypatch.setattr(optuna.study.Study, "ask", racing_ask)
    result = tune(["baseline"], 1, out, PLAIN, seeds=0)
    trials = _study(out, "baseline").trials
    assert [(t.state.name, t.user_attrs.get("surplus")) for t in trials] == [("RUNNING", None), ("FAIL", True)]
    assert result.waiting == {"baseline": 1}
    assert not (out / ".trials").exists()  # nothing ran


def test_a_method_whose_search_space_is_empty_is_refused_by_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from distillistic.methods import catalogue
    from distillistic.methods.spec import MethodSpec, Param

    spec = MethodSpec("flat", "a method of tests", "CE", params=(Param("flat_w", float, 1.0, "w", space=Space(1, 1)),))
    real = catalogue.specs
    monkeypatch.setattr(catalogue, "specs", lambda: {**real(), "flat": spec})
    out = tmp_path / "t"
    rc, _, err = run_cli(["tune", "--algo", "flat", "--trials", "2", *FLAGS, "--out", str(out)], capsys)
    assert rc == 2
    assert err == ["distillistic: error: tune: method 'flat': the search space of 'flat_w' is empty (low 1 >= high 1); "
                   "fix the parameter's space"]
    assert not out.exists()
