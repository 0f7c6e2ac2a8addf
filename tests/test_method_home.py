"""A method is one module: its spec is found without torch, its name appears nowhere else, and a method
registered from the user's own module (a plugin) has parameters that work from the CLI, YAML and a sweep."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distillistic.methods import catalogue
from distillistic.methods.registry import METHODS

SRC = Path(__file__).resolve().parents[1] / "src" / "distillistic"

PLUGIN = textwrap.dedent('''
    from distillistic.core.objective import Distill
    from distillistic.methods.registry import register_method
    from distillistic.methods.spec import MethodSpec, Param, above
    from distillistic.methods.tfkd import Virtual

    SPEC = MethodSpec("sharp", "test plugin: a virtual teacher of tunable sharpness",
                      "L = (1-a) CE + a KL(v(p) ‖ softmax(z))", family="self", reads=("divergence",),
                      params=(Param("sharp_p", float, 0.8, "probability of the true class", range=above(0.1)),))

    def terms(cfg, ctx):
        print(f"SHARP_P={cfg.sharp_p}", flush=True)
        return (Distill("sharp", Virtual(cfg.sharp_p, smooth=False, name="sharp"), cfg.divergence, 1.0),)

    register_method(SPEC, terms)
''')


def test_every_builtin_method_module_has_its_spec_found_without_importing_it() -> None:
    """A spec the catalogue cannot read (an assignment it cannot evaluate) would make its method vanish."""
    for path in sorted((SRC / "methods").glob("*.py")):
        source = path.read_text()
        registered = len(re.findall(r"^register_method\(", source, flags=re.M))
        found = [n for n in catalogue.specs() if catalogue.builtin_module(n) == f"distillistic.methods.{path.stem}"]
        assert len(found) == registered, path.name
        for name in found:
            assert METHODS.get(name).spec == catalogue.specs()[name]


def test_no_method_name_outside_its_module() -> None:
    """The framework (config, core, data, models, training, runs, teachers, the CLI) quotes no built-in method's
    name: a method's module is its one home. ``experiments/`` is exempt (a demo or a thesis claim *is* a
    comparison of named methods, as a config file is), and so are "baseline" (the default algorithm, which also
    trains the teachers) and "kd" (also the word for an added KD term)."""
    names = [n for n in catalogue.specs() if n not in ("kd", "baseline")]
    pattern = re.compile("[\"'](" + "|".join(map(re.escape, names)) + ")[\"']")
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if {"methods", "experiments"} & set(path.relative_to(SRC).parts):
            continue
        for k, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(SRC)}:{k}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_a_real_method_module_is_small() -> None:
    for name in ("dkd", "kd", "dml", "crd"):
        lines = (SRC / "methods" / f"{name}.py").read_text().count("\n")
        assert lines <= 300, (name, lines)


@pytest.mark.slow
def test_a_plugin_method_with_a_parameter_runs_from_the_cli_yaml_and_a_sweep(tmp_path: Path) -> None:
    (tmp_path / "sharp_method.py").write_text(PLUGIN)
    common = ["--dataset", "synthetic", "--synthetic-samples", "64", "--model", "cnn", "--epochs", "1",
              "--batch-size", "32", "--device", "cpu", "--no-tensorboard", "--quiet"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "distillistic", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)

    out = run("train", "--plugins", "sharp_method", "--algo", "sharp", "--sharp-p", "0.95", *common,
              "--out", "cli")
    assert out.returncode == 0, out.stderr
    assert "SHARP_P=0.95" in out.stdout
    assert "sharp_p: 0.95" in (tmp_path / "cli" / "config.yaml").read_text()
    bad = run("train", "--plugins", "sharp_method", "--algo", "sharp", "--sharp-p", "0.05", *common, "--out", "bad")
    assert bad.returncode == 2
    assert "sharp_p" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    other = run("train", "--plugins", "sharp_method", "--algo", "baseline", "--sharp-p", "0.9", *common,
                "--out", "other")
    assert other.returncode == 2
    assert "read by sharp" in other.stderr
    (tmp_path / "run.yaml").write_text("plugins: [sharp_method]\nalgo: sharp\nsharp_p: 0.7\n")
    out = run("train", "run.yaml", *common, "--out", "yaml")
    assert out.returncode == 0, out.stderr
    assert "SHARP_P=0.7" in out.stdout
    (tmp_path / "sweep.yaml").write_text("plugins: [sharp_method]\nalgo: sharp\ndataset: synthetic\n"
                                         "synthetic_samples: 64\nmodel: cnn\nepochs: 1\nbatch_size: 32\n"
                                         "device: cpu\ntensorboard: false\ngrid: {sharp_p: [0.6, 0.9]}\n")
    out = run("sweep", "sweep.yaml", "--out", "sweep")
    assert out.returncode == 0, out.stderr
    assert "SHARP_P=0.6" in out.stdout
    assert "SHARP_P=0.9" in out.stdout
    assert {p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir() and "sharp_p" in p.name} == {
        "sharp_p=0.6", "sharp_p=0.9"}
