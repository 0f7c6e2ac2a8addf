"""Fuzzing the config: any YAML file and any ``--set``/flag yields a valid Config or one clean UserError.

"Valid" is checked, not assumed: every field of the result has its declared type, floats are finite,
and ``validate`` accepts it again after ``resolve``. "Clean" means a :class:`UserError` whose message
is one non-empty line (the CLI prints it as is); any other exception fails the test.
"""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from distillistic import cli
from distillistic import config as config_mod
from distillistic.config import FIELDS, Config
from distillistic.errors import UserError
from distillistic.training import setup

KEYS = sorted(FIELDS)
SPECIAL_STRINGS = ["nan", "NaN", "inf", "-inf", ".inf", "1e999", "-1", "0", "1e3", "3.5", "none", "null", "~", "",
                   "true", "off", "[1, 2]", "[0.7, 0.1, 0.2]", "{a: 1}", "kd", "dml", "resnet18", "cnn", "cpu",
                   "cuda:x", "auto", "synthetic", "\n", "a\nb", "'", '"', "!!python/object:os.system", "1" * 5000]
HUGE = st.sampled_from([2**63, -(2**63), 2**64, 10**30, 10**400, -(10**400)])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), HUGE,
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.sampled_from(SPECIAL_STRINGS))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k.replace("_", "-")),
                 st.text(max_size=12))
mappings = st.dictionaries(keys, values, max_size=6)


def _plausible(key: str) -> st.SearchStrategy[Any]:
    """Values near the valid range of ``key`` (so that the fuzz also reaches valid configs), and some not."""
    from distillistic.core import divergences
    from distillistic.data import loader as data
    from distillistic.methods import registry as methods
    from distillistic.models import builders as models

    names = {"algo": methods.METHODS, "dataset": data.DATASETS, "model": models.MODELS, "teacher": models.MODELS,
             "divergence": divergences.DIVERGENCES}
    hint = HINTS[key]
    inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = inner[0]
    if key in names:
        return st.sampled_from([*names[key].names(), "nope"])
    if key in config_mod.CHOICES:
        return st.sampled_from([*config_mod.CHOICES[key], "nope"])
    if base is bool:
        return st.booleans()
    if base is int:
        return st.integers(-2, 300)
    if base is float:
        return st.one_of(st.floats(-0.5, 1.5), st.sampled_from([1e-3, 0.5, 20.0, 0.0]))
    if typing.get_origin(base) is tuple:
        return st.lists(st.floats(0, 1), min_size=2, max_size=4)
    return st.one_of(st.sampled_from(["random", "train", "imagenet", "auto", "cpu", "x"]), st.text(max_size=6))


plausible_mappings = st.lists(st.sampled_from(KEYS).flatmap(lambda k: st.tuples(st.just(k), _plausible(k))),
                              max_size=6).map(dict)
key_values = st.tuples(keys, st.one_of(st.sampled_from(SPECIAL_STRINGS), st.text(max_size=12)))
set_items = st.lists(st.one_of(key_values.map(lambda kv: f"{kv[0]}={kv[1]}"), st.text(max_size=16)), max_size=4)


def _conforms(value: Any, hint: Any) -> bool:
    """``value`` is an instance of the type annotation ``hint`` (bools are not ints; floats are finite)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args))
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and -(2**63) < value < 2**63
    if hint is float:
        return isinstance(value, float) and math.isfinite(value)
    return isinstance(value, hint)


HINTS = typing.get_type_hints(Config)


def _assert_valid(cfg: Config) -> None:
    for name in FIELDS:
        assert _conforms(getattr(cfg, name), HINTS[name]), (name, getattr(cfg, name))
    setup.check(cfg)  # a second validation must accept what the first let through


def _assert_clean(error: UserError) -> None:
    message = str(error)
    assert message.strip(), "empty error message"
    assert "\n" not in message, f"multi-line message: {message!r}"
    assert "\r" not in message, f"multi-line message: {message!r}"
    assert len(message) < 600, f"message too long ({len(message)} characters)"


def _load(tmp_path: Path, text: str, items: list[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg = config_mod.load(path, config_mod.parse_set(items))
        _assert_valid(cfg)
        resolved = setup.resolve(cfg)
        _assert_valid(resolved)
        event("valid config")
        for classes, size in ((10, resolved.image_size or 28), (2, 8)):  # the data-dependent checks too
            config_mod.validate_for_data(resolved, classes, size)
    except UserError as e:
        _assert_clean(e)
        event(f"UserError: {type(e).__name__}")


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@pytest.mark.e2e
@FUZZ
@given(data=mappings, items=set_items)
def test_yaml_mapping_and_set_overrides_give_a_config_or_a_clean_error(tmp_path: Path, data: dict[str, Any],
                                                                       items: list[str]) -> None:
    _load(tmp_path, yaml.safe_dump(data, allow_unicode=True), items)


@pytest.mark.e2e
@FUZZ
@given(data=plausible_mappings, items=st.lists(st.sampled_from(KEYS).flatmap(
    lambda k: _plausible(k).map(lambda v: f"{k}={v}")), max_size=3))
def test_plausible_mappings_give_a_config_or_a_clean_error(tmp_path: Path, data: dict[str, Any],
                                                          items: list[str]) -> None:
    """Values near each key's valid range: reaches valid configs and the boundaries between."""
    _load(tmp_path, yaml.safe_dump(data), items)


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(
    SPECIAL_STRINGS)), max_size=5).map(lambda kv: "".join(f"{k}: {v}\n" for k, v in kv))))
def test_arbitrary_yaml_text_gives_a_config_or_a_clean_error(tmp_path: Path, text: str) -> None:
    _load(tmp_path, text, [])


@pytest.mark.e2e
@FUZZ
@given(flags=st.lists(st.tuples(st.sampled_from(KEYS), st.one_of(st.sampled_from(SPECIAL_STRINGS),
                                                                  st.text(max_size=10),
                                                                  st.sampled_from(KEYS).flatmap(_plausible).map(str))),
                      max_size=4))
def test_cli_flags_give_a_run_or_exit_2_with_one_line(flags: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Through the real argument parser; ``train`` itself is replaced by a check of the config it receives."""
    reached: list[Config] = []

    def fake_train(cfg: Config) -> Any:
        _assert_valid(cfg)
        reached.append(cfg)
        return types.SimpleNamespace(summary={"status": "fake"}, out=cfg.out)

    monkeypatch.setattr("distillistic.training.run.train", fake_train)
    argv = ["train"]
    for key, value in flags:
        flag = "--" + key.replace("_", "-")
        bool_flag = HINTS[key] in (bool, bool | None)
        argv += [flag] if bool_flag else [f"{flag}={value}"]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse: a malformed flag
        code = int(e.code or 0)
    err = capsys.readouterr().err
    event("reached train" if reached else "refused")
    if reached:
        assert code == 0
    else:
        assert code == 2, (argv, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, (argv, err)
        assert lines[0].startswith("distillistic: error: "), (argv, err)


@pytest.mark.parametrize(("items", "key"), [
    (["lr=nan"], "lr"), (["lr=.inf"], "lr"), (["lr=1e999"], "lr"), (["epochs=1e400"], "epochs"),
    (["epochs=" + "9" * 30], "epochs"), (["seed=-1"], "seed"), (["alpha=[0.1]"], "alpha"),
    (["batch_size={a: 1}"], "batch_size"), (["device=cuda:x"], "device"), (["temperature=.nan"], "temperature"),
])
def test_known_bad_values_name_their_key(items: list[str], key: str) -> None:
    with pytest.raises(UserError, match=f"config key '{key}'"):
        config_mod.load(None, config_mod.parse_set(items))


def test_exact_integers_survive_coercion() -> None:
    """Long digit strings are read exactly, not through a float (which would round 2**53 + 1)."""
    assert config_mod.coerce("seed", str(2**53 + 1)) == 2**53 + 1
    assert config_mod.coerce("epochs", "1e3") == 1000
    with pytest.raises(UserError, match="whole number"):
        config_mod.coerce("epochs", 2.5)
