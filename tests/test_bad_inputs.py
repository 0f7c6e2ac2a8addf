"""Every bad input of docs/bad-inputs.md: exit code 2, one line naming the problem, nothing lost.

The cases live in ``tests/bad_inputs.py`` (which also regenerates the table). Each runs the real CLI
entry point in this process, with stderr, log records and warnings captured together, next to a
copy of a finished run that must stay byte-identical (most cases even pass ``--overwrite`` for it).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

import _forked_cli as forked_cli
from bad_inputs import CASES, Workspace, documented_messages, make_reference_run, normalise, run_argv

REGENERATE = "regenerate the table: PYTHONPATH=src python tests/bad_inputs.py"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTILLISTIC_CACHE", str(tmp_path_factory.mktemp("cache")))
        return make_reference_run(tmp_path_factory.mktemp("pristine"))


@pytest.fixture
def workspace(tmp_path: Path, pristine: Path) -> Workspace:
    ws = Workspace(tmp_path / "tmp", tmp_path / "run")
    ws.tmp.mkdir()
    shutil.copytree(pristine, ws.run)
    return ws


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_table_lists_every_case_and_at_least_25() -> None:
    documented = documented_messages()
    assert sorted(documented) == sorted(c.id for c in CASES), REGENERATE
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.e2e
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_line_exit_2_and_loses_nothing(case: object, workspace: Workspace) -> None:
    from bad_inputs import Case

    assert isinstance(case, Case)
    if case.needs is not None and importlib.util.find_spec(case.needs) is None:
        pytest.skip(f"needs {case.needs}, of the optional extra 'deploy' (pip install '.[deploy]')")
    argv = case.argv(workspace)  # writes the case's files (some replace a file of the run: the setup)
    before = _snapshot(workspace.run)
    code, text = run_argv(argv, case.fashion_offline, case.patch)
    assert code == 2, (argv, text)
    assert "Traceback" not in text
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"more than one line on stderr:\n{text}"
    assert lines[0].startswith("distillistic: error: ")
    assert _snapshot(workspace.run) == before, "the existing run directory changed"
    assert normalise(lines[0], workspace) == documented_messages()[case.id], REGENERATE


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("case_id", ["resume-malicious", "idx-truncated"])
def test_in_a_real_process_too(case_id: str, workspace: Workspace) -> None:
    """The same through ``python -m distillistic``: the process's own stderr, exit status and no traceback."""
    case = next(c for c in CASES if c.id == case_id)
    argv = case.argv(workspace)
    before = _snapshot(workspace.run)
    result = forked_cli.run(argv, timeout=120)  # a process of its own, forked from a server with torch imported
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert normalise(result.stderr.strip(), workspace) == documented_messages()[case_id]
    assert _snapshot(workspace.run) == before


@pytest.mark.e2e
@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_found_damaged_only_when_decoded_is_named(workers: int, workspace: Workspace,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """With ``data_hash=listing`` no file is read up front: a damaged image surfaces during training, in a
    DataLoader worker or not, still as one error line naming the file (after the run's own log lines)."""
    from distillistic import cli

    root = workspace.image_folder(per_class=6)
    bad = root / "cat" / "3.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG body \xff\xd9")
    out = workspace.tmp / "out"
    code = cli.main(["train", "--dataset", "imagefolder", "--data-root", str(root), "--image-size", "8", "--model",
                     "mlp", "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--no-tensorboard",
                     "--no-progress", "--num-workers", str(workers), "--split-fractions", "0.5,0.25,0.25",
                     "--data-hash", "listing", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"distillistic: error: image file '{bad}' cannot be decoded (")
    assert err[-1].endswith("); remove or replace it")
    # with the default (content) hash, a file PIL cannot identify is refused before anything is written
    bad.write_bytes(bytes(100))
    capsys.readouterr()
    code = cli.main(["train", "--dataset", "imagefolder", "--data-root", str(root), "--image-size", "8", "--model",
                     "mlp", "--epochs", "1", "--device", "cpu", "--no-tensorboard", "--no-progress",
                     "--split-fractions", "0.5,0.25,0.25", "--out", str(workspace.tmp / "out2")])
    assert code == 2
    assert capsys.readouterr().err == (f"distillistic: error: image file '{bad}' is not an image PIL can read "
                                       "(UnidentifiedImageError); remove or replace it\n")
    assert not (workspace.tmp / "out2").exists()
