"""What a model costs: parameters, arithmetic per image, latency, throughput and peak memory.

FLOPs are counted by PyTorch's own :class:`torch.utils.flop_counter.FlopCounterMode`, never from a
hand-made table. It counts the matrix products and convolutions (``mm``, ``addmm``, ``bmm``,
``convolution``, attention, and their backward), two FLOPs per multiply-accumulate; element-wise work
(activations, normalisation, pooling, optimizer updates) is not counted, which is the convention of
the published counts (torchvision's ResNet-18: 1.81 GMACs at 224 px). MACs are FLOPs / 2.

Latency is the wall time of one forward of a single image (batch 1) after a warm-up, as the median
and the 90th percentile of ``calls`` timed calls, with the thread count recorded; throughput is
images per second at a large batch. On CUDA every timed call ends with a synchronisation (the work
is done, not just queued) and peak memory is the allocator's peak during the large batch.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

LATENCY_CALLS = 30  # timed calls at batch 1 (after WARMUP_CALLS untimed ones)
WARMUP_CALLS = 5
THROUGHPUT_CALLS = 3


def parameter_total(model: nn.Module) -> int:
    """Every parameter of ``model`` (trainable or frozen), each shared tensor once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def count_flops(work: Callable[[], Any]) -> int:
    """FLOPs of whatever ``work()`` runs, as :class:`FlopCounterMode` counts them (forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        work()
    return int(counter.get_total_flops())


def _first(model: nn.Module) -> torch.Tensor | None:
    return next(iter(model.parameters()), None)


def example_input(model: nn.Module, shape: tuple[int, int, int], batch: int = 1,
                  channels_last: bool = False) -> torch.Tensor:
    """A zero batch ``[batch, *shape]`` on the model's device and in its floating dtype."""
    p = _first(model)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    x = torch.zeros(batch, *shape, device=device, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def forward_cost(model: nn.Module, shape: tuple[int, int, int], channels_last: bool = False) -> dict[str, int]:
    """Parameters and the FLOPs and MACs of one image's forward at ``shape`` (C, H, W), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            flops = count_flops(lambda: model(example_input(model, shape, 1, channels_last)))
    finally:
        model.train(was_training)
    return {"params": parameter_total(model), "flops": flops, "macs": flops // 2}


def meta_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device, without its hooks: counted, it computes nothing and fires no tap."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    return twin.to("meta")


def shape_cost(model: nn.Module, shape: tuple[int, int, int]) -> dict[str, int]:
    """:func:`forward_cost` of ``model`` counted on its :func:`meta_twin` (the model itself never runs)."""
    return forward_cost(meta_twin(model), shape)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(model: nn.Module, x: torch.Tensor, calls: int) -> list[float]:
    """Seconds of each of ``calls`` forwards (each one finished before the clock stops)."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        model(x)
        _synchronize(x.device)
        times.append(time.perf_counter() - start)
    return times


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0–100) with linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def speed(model: nn.Module, shape: tuple[int, int, int], batch: int, calls: int = LATENCY_CALLS,
          channels_last: bool = False) -> dict[str, Any]:
    """Latency at batch 1 (median and p90 of ``calls`` timed forwards, in ms) and throughput at ``batch``."""
    if calls < 1 or batch < 1:
        raise ValueError(f"speed: calls ({calls}) and batch ({batch}) must be at least 1")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            one = example_input(model, shape, 1, channels_last)
            _timed(model, one, WARMUP_CALLS)
            times = _timed(model, one, calls)
            many = example_input(model, shape, batch, channels_last)
            _timed(model, many, 1)
            if many.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(many.device)
            big = _timed(model, many, THROUGHPUT_CALLS)
            peak = torch.cuda.max_memory_allocated(many.device) if many.device.type == "cuda" else None
    finally:
        model.train(was_training)
    return {"latency_ms": {"median": 1000 * statistics.median(times), "p90": 1000 * percentile(times, 90),
                           "calls": calls, "batch": 1},
            "throughput_images_per_second": batch * len(big) / max(sum(big), 1e-12), "throughput_batch": batch,
            "threads": torch.get_num_threads(), "device": str(one.device),
            "peak_memory_bytes": peak}
