"""A method is one module: its spec is found without torch, its name appears nowhere else, and a method
registered from the user's own module (a plugin) has parameters that work from the CLI, YAML and a sweep."""

from __future__ import annotations

import ast
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

import _forked_cli as forked_cli
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


def _framework_strings(path: Path) -> list[tuple[int, str]]:
    """The string constants of a module's code (its help texts, messages, keys), without its docstrings."""
    tree = ast.parse(path.read_text())
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_no_method_name_in_the_frameworks_help_and_messages() -> None:
    """Beyond quoted names: no built-in method's name as a word inside a string of the framework's code (a help
    text such as "as KDCL and PCL train", a list of methods in a message, a method's flag), in any case. Names
    that are also common words or tokens (at, ls, sp, dist, dot, ban, kd, baseline) are left to the quoted check
    above; docstrings are prose, as the docs are."""
    common = {"kd", "baseline", "at", "ls", "sp", "dist", "dot", "ban"}
    names = sorted((n for n in catalogue.specs() if n not in common), key=len, reverse=True)
    assert len(names) > 10
    word = re.compile(r"(?<![\w/.])(" + "|".join(map(re.escape, names)) + r")(?!\w)", re.IGNORECASE)
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if {"methods", "experiments"} & set(path.relative_to(SRC).parts):
            continue
        offenders += [f"{path.relative_to(SRC)}:{k}: {text[:80]!r}" for k, text in _framework_strings(path)
                      if word.search(text)]
    assert not offenders, "\n".join(offenders)
    assert word.search("help: as KDCL and PCL train")  # the check can fail: a name, a flag of a method's own
    assert word.search("set --dkd-beta")
    assert not word.search("src/dml.py, distillistic.methods.dml")  # a path or a module is not a name


def test_no_framework_module_reads_a_methods_parameter() -> None:
    """A built-in method's parameter (``cfg.virtual_p``, ``cfg.dkd_beta``) is read by its own module only: the
    framework reaches a method through its hooks (whose names, such as ``generations``, are not parameters)."""
    import dataclasses

    from distillistic.methods.registry import Method

    hooks = {f.name for f in dataclasses.fields(Method)}
    params = set(catalogue.builtin_params()) - hooks
    assert {"virtual_p", "dkd_beta"} <= params
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if "methods" in path.relative_to(SRC).parts:
            continue
        offenders += [f"{path.relative_to(SRC)}:{n.lineno}: .{n.attr}" for n in ast.walk(ast.parse(path.read_text()))
                      if isinstance(n, ast.Attribute) and n.attr in params]
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

    def run(*args: str) -> subprocess.CompletedProcess[str]:  # a process of its own, forked with torch imported
        return forked_cli.run(list(args), timeout=300, cwd=tmp_path)

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
