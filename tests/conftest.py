"""Shared fixtures. Tests run on the CPU with one thread per xdist worker and never touch the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from distillistic.training import cores

torch.set_num_threads(1)
# Every run a test starts (in this process, or a CLI or torchrun child, which inherit the environment) takes one
# thread: a run's default is every core of the machine, and two xdist workers, each running with all the cores
# while the other does too, slow each other down several-fold (test_algorithms.py: 131 s -> 29 s on 2 cores).
os.environ.setdefault(cores.RUNS_ENV, str(cores.available_cores()))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MNIST_T10K = SHARED / "mnist-t10k"
IMAGENET_SAMPLE = SHARED / "imagenet-sample100"


COSTS = ("e2e", "multiprocess")  # the markers of a test that trains end to end or starts processes


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test gets a cost marker: ``unit`` unless it is marked ``e2e`` or ``multiprocess`` (a ``slow`` test
    without either counts as ``e2e``). ``make test-fast`` runs ``-m unit``; see CONTRIBUTING.md, "Tests"."""
    for item in items:
        if not any(item.get_closest_marker(m) for m in COSTS):
            item.add_marker(pytest.mark.e2e if item.get_closest_marker("slow") else pytest.mark.unit)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own cache folder (trained teachers, stores, downloads)."""
    monkeypatch.setenv("DISTILLISTIC_CACHE", str(tmp_path_factory.mktemp("cache")))
    os.environ.setdefault("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))


@pytest.fixture
def mnist_t10k() -> Path:
    if not (MNIST_T10K / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("../shared/datasets/mnist-t10k is not present")
    return MNIST_T10K
