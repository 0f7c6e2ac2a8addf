"""The flat config: flags = keys, YAML, --set, coercion, resolution of defaults, validation messages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from distillistic import config as config_mod
from distillistic.cli import build_parser
from distillistic.config import Config
from distillistic.errors import ConfigError, UserError
from distillistic.training import setup


def test_every_config_key_is_a_flag() -> None:
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    flags = {opt for action in train._actions for opt in action.option_strings}
    for f in dataclasses.fields(Config):
        if f.metadata.get("hidden"):  # plugin methods' parameters: each is a flag of its own once registered
            continue
        assert "--" + f.name.replace("_", "-") in flags, f.name


@pytest.mark.parametrize(("key", "raw", "value"), [
    ("epochs", "3", 3), ("epochs", 3.0, 3), ("epochs", "2e1", 20), ("lr", "1e-3", 1e-3), ("lr", 2, 2.0),
    ("overwrite", "yes", True), ("overwrite", "off", False), ("students", "none", None), ("students", "4", 4),
    ("split_fractions", "0.8, 0.1, 0.1", (0.8, 0.1, 0.1)), ("split_fractions", [0.6, 0.2, 0.2], (0.6, 0.2, 0.2)),
    ("class_names", "[n01, n02]", ("n01", "n02")), ("class_names", ["a"], ("a",)), ("model", 18, "18"),
    ("temperature", "null", None),
])
def test_coerce(key: str, raw: object, value: object) -> None:
    assert config_mod.coerce(key, raw) == value


@pytest.mark.parametrize(("key", "raw", "allowed"), [
    ("epochs", "1.5", "a whole number"), ("epochs", True, "a whole number"), ("lr", "fast", "a number"),
    ("overwrite", "maybe", "true or false"), ("split_fractions", "0.5, 0.5", "a list of 3 values"),
    ("model", ["a"], "a string"),
])
def test_coerce_errors_name_the_key_and_what_is_allowed(key: str, raw: object, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_mod.coerce(key, raw)
    assert f"config key '{key}'" in str(info.value)
    assert allowed in str(info.value)


def test_set_items() -> None:
    assert config_mod.parse_set(["alpha=0.3", "virtual-smooth=true", "class_names=[a, b]", "teacher="]) == {
        "alpha": 0.3, "virtual_smooth": True, "class_names": ("a", "b"), "teacher": None}
    with pytest.raises(UserError, match="--set expects key=value, got 'alpha'"):
        config_mod.parse_set(["alpha"])
    with pytest.raises(UserError, match=r"unknown config key 'temprature' \(did you mean 'temperature'\?\)"):
        config_mod.parse_set(["temprature=2"])


def test_yaml_files(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("algo: dml\nstudents: 2\nvirtual-p: 0.8\nclass_names: [x, y]\n")
    cfg = config_mod.load(good, {"students": 4})
    assert (cfg.algo, cfg.students, cfg.virtual_p, cfg.class_names) == ("dml", 4, 0.8, ("x", "y"))
    with pytest.raises(UserError, match="does not exist"):
        config_mod.load(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("algo: dml\nstudents: [2\n")
    with pytest.raises(UserError, match=r"is not valid YAML at line \d"):
        config_mod.load(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        config_mod.load(listing)
    assert config_mod.load(tmp_path / "good.yaml", {}) == config_mod.load(good)


def test_a_saved_resolved_config_loads_back_equal(tmp_path: Path) -> None:
    cfg = setup.resolve(Config(algo="kd", dataset="digits", class_names=("1", "2"), split_fractions=(0.6, 0.2,
                                                                                                         0.2)))
    config_mod.save(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["class_names"] == ["1", "2"]
    assert config_mod.load(tmp_path / "config.yaml") == cfg


def test_resolve_fills_every_default() -> None:
    cfg = setup.resolve(Config(algo="kd", dataset="digits", seed=5, batch_size=32, epochs=7))
    assert cfg.data_seed == 5
    assert cfg.eval_batch_size == 64
    assert cfg.teacher_epochs == 7
    assert cfg.image_size == 8
    assert cfg.augment == "none"
    assert cfg.weight_decay == 0.01
    assert cfg.temperature == 20.0
    assert cfg.teacher == ("resnet50",)
    assert cfg.students == 1
    assert setup.resolve(Config(dataset="mnist", optimizer="sgd")).weight_decay == 1e-4
    assert setup.resolve(Config(dataset="fashion-mnist")).augment == "randaugment"
    assert setup.resolve(Config(dataset="imagefolder")).image_size == 224
    assert setup.resolve(Config(dataset="synthetic")).image_size == 16
    explicit = setup.resolve(Config(algo="dml", dataset="digits", data_seed=9, temperature=3.0, students=5))
    assert (explicit.data_seed, explicit.temperature, explicit.students) == (9, 3.0, 5)
    assert setup.resolve(cfg) == cfg  # resolving twice changes nothing


@pytest.mark.parametrize(("changes", "key"), [
    ({"epochs": 0}, "epochs"), ({"batch_size": -1}, "batch_size"), ({"lr": 0.0}, "lr"), ({"alpha": 1.01}, "alpha"),
    ({"temperature": 0.0}, "temperature"), ({"virtual_p": 0.0}, "virtual_p"), ({"virtual_p": 1.1}, "virtual_p"),
    ({"algo": "dml", "students": 1}, "students"), ({"split_fractions": (0.5, 0.5, 0.1)}, "split_fractions"),
    ({"split_fractions": (0.8, 0.0, 0.2)}, "split_fractions"), ({"val_fraction": 1.0}, "val_fraction"),
    ({"optimizer": "adam"}, "optimizer"), ({"student_weights": "train"}, "student_weights"),
    ({"student_resolution": 0}, "student_resolution"), ({"device": "tpu"}, "device"),
])
def test_validation_names_the_key(changes: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        setup.check(Config(**changes))  # type: ignore[arg-type]
    assert info.value.key == key
    assert str(info.value).startswith(f"config key '{key}' = ")


def test_augment_none_means_no_augmentation(tmp_path: Path) -> None:
    """"none" is a choice of --augment, not "unset" (which would fall back to the dataset's RandAugment)."""
    assert config_mod.coerce("augment", "none") == "none"
    assert config_mod.coerce("augment", "None") is None  # other spellings still mean unset
    assert setup.resolve(config_mod.load(None, {"dataset": "mnist", "augment": "none"})).augment == "none"
    path = tmp_path / "c.yaml"
    path.write_text("dataset: fashion-mnist\naugment: none\n")
    assert setup.resolve(config_mod.load(path)).augment == "none"
    assert setup.resolve(config_mod.load(None, {"dataset": "mnist"})).augment == "randaugment"
