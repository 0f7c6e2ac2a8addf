"""Keys the user set explicitly that a run would silently not use are refused, where a default cannot tell them.

* DOT trains with its own optimizer (mdistiller's, a form of SGD: its ``DOT.init_optimizer`` raises for any
  other solver): an explicit ``optimizer`` other than ``sgd`` (flag, ``--set``, the run's YAML, a sweep cell's
  own keys, ``train(**overrides)``) is refused; the default, unset, and a sweep's shared key are not.
* ``--data-root`` for a dataset that reads no folder (synthetic, digits, the shipped MNIST t10k) is refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from _util import run_cli
from distillistic import train
from distillistic.config import Config
from distillistic.errors import UserError
from distillistic.experiments.grid import expand
from distillistic.training import setup

DOT_REFUSED = ("config key 'optimizer' = 'adamw' is not used by algo dot, which trains with its own optimizer "
               "(a form of sgd); remove optimizer, or set it to sgd")
TINY = ["--dataset", "synthetic", "--synthetic-samples", "96", "--image-size", "8", "--model", "mlp", "--epochs",
        "1", "--batch-size", "16", "--device", "cpu", "--no-tensorboard", "--no-progress"]
DOT = {"algo": "dot", "teacher": "mlp", "teacher_weights": "random"}


@pytest.mark.unit
@pytest.mark.parametrize("given", [{"optimizer"}, {"optimizer", "lr"}])
def test_an_explicit_other_optimizer_is_refused_for_dot(given: set[str]) -> None:
    cfg = Config(**DOT, optimizer="adamw")
    with pytest.raises(UserError) as e:
        setup.check_given(cfg, given)
    assert str(e.value) == DOT_REFUSED


@pytest.mark.unit
def test_dot_accepts_its_own_optimizer_the_default_left_unset_and_other_methods_any() -> None:
    setup.check_given(Config(**DOT, optimizer="sgd"), {"optimizer"})  # its own: accepted
    setup.check_given(Config(**DOT), {"lr", "epochs"})  # adamw by default, not given: accepted
    setup.check_given(Config(algo="kd", optimizer="adamw"), {"optimizer"})  # kd reads --optimizer
    setup.check_given(Config(algo="no_such_method", optimizer="adamw"), {"optimizer"})  # named by check()


@pytest.mark.unit
def test_the_python_api_refuses_it_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        train(Config(**DOT, dataset="synthetic", out=str(tmp_path / "run")), optimizer="adamw")
    assert str(e.value) == DOT_REFUSED
    assert not (tmp_path / "run").exists()


@pytest.mark.unit
def test_a_run_config_file_setting_it_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dot.yaml"
    path.write_text("algo: dot\nteacher: mlp\nteacher-weights: random\noptimizer: adamw\n")
    rc, _, err = run_cli(["train", str(path), *TINY, "--out", str(tmp_path / "run")], capsys)
    assert (rc, err) == (2, [f"distillistic: error: {DOT_REFUSED}"])
    path.write_text("algo: dot\nteacher: mlp\nteacher-weights: random\noptimizer: sgd\n")
    rc, _, err = run_cli(["train", str(path), *TINY, "--epochs", "0", "--out", str(tmp_path / "run")], capsys)
    assert rc == 2
    assert "'epochs' = 0" in err[0]  # sgd passed: the next check speaks


@pytest.mark.unit
def test_a_sweep_refuses_it_in_a_dot_cell_own_keys_not_in_its_shared_ones() -> None:
    shared = {"dataset": "synthetic", "optimizer": "adamw", "variants": {"kd": {"algo": "kd"}, "dot": DOT}}
    plan = expand(shared)  # the shared optimizer is the other cells' (and a teacher trained first's)
    assert [c.name for c in plan.cells] == ["kd", "dot"]
    own = {"dataset": "synthetic", "variants": {"kd": {"algo": "kd"}, "dot": {**DOT, "optimizer": "adamw"}}}
    with pytest.raises(UserError) as e:
        expand(own)
    assert str(e.value) == f"sweep: cell 'dot': {DOT_REFUSED}"
    grid = {"dataset": "synthetic", **DOT, "grid": {"optimizer": ["sgd", "adamw"]}}
    with pytest.raises(UserError) as e:
        expand(grid)
    assert str(e.value) == f"sweep: cell 'optimizer=adamw': {DOT_REFUSED}"


@pytest.mark.unit
@pytest.mark.parametrize(("dataset", "why"), [
    ("synthetic", "its images are generated in memory"),
    ("digits", "scikit-learn's bundled copy"),
    ("mnist-t10k", "its digits are shipped in the package"),
])
def test_a_data_root_for_a_dataset_without_a_folder_is_refused(dataset: str, why: str, tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        setup.check(Config(dataset=dataset, data_root=str(tmp_path)))
    assert str(e.value) == (f"config key 'data_root' is not read by dataset {dataset} ({why}); remove it, or choose "
                            "a dataset read from a folder: cifar10, cifar100, fashion-mnist, imagefolder, mnist")
    setup.check(Config(dataset=dataset))  # unset: fine
    setup.check(Config(dataset="mnist", data_root=str(tmp_path)))  # a folder dataset reads it (when it loads)
