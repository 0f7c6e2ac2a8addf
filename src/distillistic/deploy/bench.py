"""Latency and throughput of a model on CPU, with the thread count stated (DESIGN.md, section 9).

Latency: batch 1, after warm-up, the median and 90th percentile of single calls. Throughput: images per
second at a large batch. Both stop after ``budget_s`` seconds or ``max_runs`` calls (at least ``min_runs``), so a
large model costs seconds, not minutes; the number of calls is recorded, and the machine's 1-minute load
average at measurement time too (on a shared machine it says how much the figures can be trusted).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from distillistic.deploy.graph import Inputs

Runner = Callable[[np.ndarray], Any]


def _timed(run: Runner, x: np.ndarray, warmup: int, min_runs: int, max_runs: int, budget_s: float) -> list[float]:
    for _ in range(warmup):
        run(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    return times


def images(inputs: Inputs, batch: int, seed: int = 0) -> np.ndarray:
    """Random uint8 images ``[batch, C, S, S]`` at the model's input size."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch, inputs.channels, inputs.image_size, inputs.image_size), dtype=np.uint8)


def measure(run: Runner, inputs: Inputs, threads: int, batch: int = 256, budget_s: float = 2.0) -> dict[str, Any]:
    """Batch-1 latency (median, p90, ms) and throughput at ``batch`` (images/s) of ``run`` on uint8 images."""
    one = _timed(run, images(inputs, 1), warmup=10, min_runs=20, max_runs=500, budget_s=budget_s)
    many = _timed(run, images(inputs, batch), warmup=2, min_runs=3, max_runs=50, budget_s=budget_s)
    return {"threads": threads, "latency_ms_median": 1e3 * statistics.median(one),
            "latency_ms_p90": 1e3 * float(np.percentile(one, 90)), "latency_runs": len(one),
            "throughput_images_per_s": batch / statistics.median(many), "throughput_batch": batch,
            "throughput_runs": len(many), "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg")
            else None}


def onnx_runner(session: Any) -> Runner:
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def torch_runner(module: torch.nn.Module, threads: int) -> Runner:
    """``module`` on uint8 numpy batches with ``threads`` intra-op threads (set for this process)."""
    torch.set_num_threads(threads)
    module.eval()

    def run(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return module(torch.from_numpy(x))

    return run
