"""Shared fixtures. Tests run on the CPU with one thread per xdist worker and never touch the network."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from _util import session_root
from distillistic.training import cores

torch.set_num_threads(1)
# Every run a test starts (in this process, or a CLI or torchrun child, which inherit the environment) takes one
# thread: a run's default is every core of the machine, and two xdist workers, each running with all the cores
# while the other does too, slow each other down several-fold (test_algorithms.py: 131 s -> 29 s on 2 cores).
os.environ.setdefault(cores.RUNS_ENV, str(cores.available_cores()))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MNIST_T10K = SHARED / "mnist-t10k"
IMAGENET_SAMPLE = SHARED / "imagenet-sample100"


# A file to which every test appends its CPU seconds (its process and the child processes it waited for, user and
# system) and its id, one line each: unlike --durations, a measure that other jobs on the machine do not inflate.
CPU_LOG = "DISTILLISTIC_TEST_CPU"

COSTS = ("e2e", "multiprocess")  # the markers of a test that trains end to end or starts processes


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test gets a cost marker: ``unit`` unless it is marked ``e2e`` or ``multiprocess`` (a ``slow`` test
    without either counts as ``e2e``). ``make test-fast`` runs ``-m unit``; see CONTRIBUTING.md, "Tests"."""
    for item in items:
        if not any(item.get_closest_marker(m) for m in COSTS):
            item.add_marker(pytest.mark.e2e if item.get_closest_marker("slow") else pytest.mark.unit)


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """With ``$DISTILLISTIC_TEST_CPU`` set, append the test's CPU seconds (setup, call and teardown) to that file."""
    path = os.environ.get(CPU_LOG)
    start = _cpu_seconds()
    yield
    if path:
        with open(path, "a") as f:  # one short line per write: two xdist workers never mix theirs
            f.write(f"{_cpu_seconds() - start:.3f}\t{item.nodeid}\n")


@pytest.fixture(scope="session")
def shared_teachers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of trained teachers for the whole test run (every xdist worker): a teacher is keyed by its
    recipe and the data's checksum, so identical teachers train once; the cache's lock keeps two workers from
    training the same one at once."""
    folder = session_root(tmp_path_factory) / "shared-teachers"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(autouse=True)
def _isolated_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own cache folder (stores, downloads), whose ``teachers`` folder is the run's shared
    one (:func:`shared_teachers`); a test marked ``own_teachers`` (it checks how teachers are trained, found or
    repaired) gets a folder of its own. A test that names its own cache (``cache_dir``, the environment of a
    subprocess) trains its teachers there, as before."""
    cache = tmp_path_factory.mktemp("cache")
    if not request.node.get_closest_marker("own_teachers"):
        (cache / "teachers").symlink_to(request.getfixturevalue("shared_teachers"), target_is_directory=True)
    monkeypatch.setenv("DISTILLISTIC_CACHE", str(cache))
    os.environ.setdefault("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))


@pytest.fixture
def mnist_t10k() -> Path:
    if not (MNIST_T10K / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("../shared/datasets/mnist-t10k is not present")
    return MNIST_T10K
