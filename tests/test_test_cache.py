"""The test run's own plumbing (tests/conftest.py): one teachers folder shared by every test, unless a test asks
for its own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _teachers() -> Path:
    return Path(os.environ["DISTILLISTIC_CACHE"]) / "teachers"


def test_a_tests_cache_is_its_own_but_its_teachers_are_the_runs(shared_teachers: Path) -> None:
    assert _teachers().is_symlink()
    assert _teachers().resolve() == shared_teachers.resolve()
    assert _teachers().parent.resolve() != shared_teachers.parent.resolve()  # stores and downloads stay per test


@pytest.mark.own_teachers
def test_a_test_marked_own_teachers_starts_without_any() -> None:
    assert not _teachers().exists()
    assert Path(os.environ["DISTILLISTIC_CACHE"]).is_dir()
