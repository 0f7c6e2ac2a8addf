"""Several teachers as a tuple: the comma form of the CLI and a YAML list give the same config, a single
teacher is still written as a plain name (so a saved run, a sweep's cell and a resume read the same), and a
single teacher's path may hold a comma."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distillistic import config as config_mod
from distillistic.config import Config
from distillistic.errors import ConfigError

pytestmark = pytest.mark.unit


def _load(tmp_path: Path, text: str, **flags: str) -> Config:
    """``config.load`` of a YAML file and flags as the CLI passes them (each coerced on its own)."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return config_mod.load(path, {k: config_mod.coerce(k, v) for k, v in flags.items()})


def test_the_yaml_list_and_the_comma_form_give_the_same_tuples(tmp_path: Path) -> None:
    listed = _load(tmp_path, "algo: kd\nteacher: [cnn, mlp]\nteacher_weights: [train, /x/run]\n")
    comma = _load(tmp_path, "algo: kd\nteacher: cnn,mlp\nteacher_weights: train,/x/run\n")
    flags = _load(tmp_path, "algo: kd\n", teacher="cnn,mlp", teacher_weights="train,/x/run")
    python = Config(algo="kd", teacher="cnn,mlp", teacher_weights="train,/x/run")  # type: ignore[arg-type]
    assert listed.teacher == ("cnn", "mlp")
    assert listed.teacher_weights == ("train", "/x/run")
    assert listed == comma == flags == python
    assert config_mod.teacher_weights_list(listed) == ["train", "/x/run"]


def test_one_teachers_path_with_a_comma_stays_one_entry(tmp_path: Path) -> None:
    path = "runs/x/baseline,seed=0"  # a sweep's cell folder
    for cfg in (Config(algo="kd", teacher=("cnn",), teacher_weights=path),  # type: ignore[arg-type]
                _load(tmp_path, f"algo: kd\nteacher: cnn\nteacher_weights: '{path}'\n"),
                _load(tmp_path, "algo: kd\nteacher: cnn\n", teacher_weights=path),
                _load(tmp_path, "algo: kd\n", teacher_weights=path)):  # the teacher the method's default
        assert cfg.teacher_weights == (path,)
    assert config_mod.teacher_weights_list(Config(algo="kd", teacher_weights=path)) == [path]  # type: ignore[arg-type]


def test_the_flags_teachers_split_the_files_weights(tmp_path: Path) -> None:
    """The file's ``teacher_weights`` is read against the teachers of the flags, which replace the file's."""
    cfg = _load(tmp_path, "algo: kd\nteacher: cnn\nteacher_weights: train,random\n", teacher="cnn,mlp")
    assert (cfg.teacher, cfg.teacher_weights) == (("cnn", "mlp"), ("train", "random"))


def test_one_entry_applies_to_every_teacher() -> None:
    cfg = Config(algo="kd", teacher=("cnn", "mlp", "cnn"), teacher_weights=("random",))
    assert config_mod.teacher_weights_list(cfg) == ["random"] * 3


def test_config_yaml_keeps_one_teacher_plain_and_lists_several(tmp_path: Path) -> None:
    one = Config(algo="kd", teacher=("cnn",), teacher_weights=("runs/a,seed=0",))
    saved = one.to_dict()
    assert (saved["teacher"], saved["teacher_weights"]) == ("cnn", "runs/a,seed=0")  # as before tuples
    assert (Config().to_dict()["teacher"], Config().to_dict()["teacher_weights"]) == (None, "train")
    several = Config(algo="kd", teacher=("cnn", "mlp"), teacher_weights=("train", "/x/run"))
    assert (several.to_dict()["teacher"], several.to_dict()["teacher_weights"]) == (["cnn", "mlp"], ["train", "/x/run"])
    shared = Config(algo="kd", teacher=("cnn", "mlp"), teacher_weights=("runs/a,seed=0",))  # one entry for both
    assert shared.to_dict()["teacher_weights"] == ["runs/a,seed=0"]  # a list: never split when read back
    path = tmp_path / "config.yaml"
    for cfg in (one, several, shared):
        config_mod.save(cfg, path)
        assert yaml.safe_load(path.read_text())["teacher"] == cfg.to_dict()["teacher"]
        assert config_mod.load(path) == cfg


@pytest.mark.parametrize(("text", "key", "allowed"), [
    ("teacher: []\n", "teacher", "an architecture, a list of several, or unset"),
    ("teacher: [mlp, [cnn]]\n", "teacher", "a string"),
    ("teacher_weights: []\n", "teacher_weights", "imagenet, random, train or a checkpoint path"),
    ("teacher: [cnn, mlp]\nteacher_weights: [train, train, train]\n", "teacher_weights",
     "one entry for all teachers or one per teacher (2: cnn,mlp)"),
    ("teacher: [cnn, mlp]\nteacher_weights: [train, ' ']\n", "teacher_weights", "a checkpoint path"),
    ("teacher_weights: [train, random]\n", "teacher_weights", "one entry, for the one teacher"),
])
def test_bad_teacher_lists_are_refused_by_key(tmp_path: Path, text: str, key: str, allowed: str) -> None:
    with pytest.raises(ConfigError, match=f"config key '{key}'") as caught:
        _load(tmp_path, "algo: kd\n" + text)
    assert allowed in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_teachers_cache_keys_are_those_of_the_comma_string_config() -> None:
    """The keys of the cached teachers did not move with the tuples: the values below were printed by the code
    that held teachers as a comma string (main at 2297eb1), for the same configs and data checksum."""
    from types import SimpleNamespace

    from distillistic.teachers.cache import recipe_key, teacher_recipe
    from distillistic.teachers.roster import teacher_configs
    from distillistic.training import setup

    data = SimpleNamespace(checksum="abc")
    common = dict(algo="kd", dataset="synthetic", model="mlp", epochs=2, synthetic_samples=64)
    one = setup.resolve(Config(teacher=("cnn",), **common))
    assert recipe_key(teacher_recipe(one), data) == "e4e9419f2fb7d019"
    two = setup.resolve(Config(teacher=("cnn", "mlp"), **common))
    assert [recipe_key(teacher_recipe(c), data) for c in teacher_configs(two)] == [
        "e4e9419f2fb7d019", "e43f216ebc87daa6"]
