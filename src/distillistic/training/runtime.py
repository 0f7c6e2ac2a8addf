"""Device, precision, distributed rank and seeds, resolved once per process.

The loop never branches on the device: it enters ``runtime.autocast()`` (a ``nullcontext`` in fp32)
and steps through ``runtime.scaler`` (a disabled ``GradScaler`` unless fp16), as nanoGPT does.
Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised here (NCCL on CUDA, Gloo on
CPU), each process drives ``cuda:LOCAL_RANK`` and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distillistic.config import MACHINE_KEYS, Config
from distillistic.errors import ConfigError, UserError
from distillistic.training.cores import available_cores, default_threads
from distillistic.training.lines import say
from distillistic.training.ranks import agree

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    precision: str  # fp32, bf16, fp16 or fp64 (resolved)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this runtime initialised the process group (a nested run must not end it)

    def __post_init__(self) -> None:
        dtype = _DTYPES.get(self.precision)
        self._autocast: Callable[[], contextlib.AbstractContextManager[Any]] = (
            (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype else contextlib.nullcontext)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of models and inputs: float64 for fp64, else float32 (autocast lowers it where it applies)."""
        return torch.float64 if self.precision == "fp64" else torch.float32

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return self._autocast()

    def all_reduce_(self, tensors: list[torch.Tensor]) -> None:
        """Sum tensors over processes in place (a no-op on one process)."""
        if self.distributed:
            for t in tensors:
                dist.all_reduce(t)

    def all_gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's rows ``[N_r, ...]`` concatenated in rank order (``t`` itself on one process).

        Ranks may hold different N_r: each pads to the largest first (all_gather needs equal shapes)."""
        if not self.distributed:
            return t
        n = torch.tensor([t.shape[0]], device=t.device)
        counts = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(counts, n)
        sizes = [int(c) for c in counts]
        padded = t.new_zeros((max(sizes), *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def average_gradients_(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients of parameters that no DDP wrapper syncs (a term's adapters) over processes."""
        if self.distributed and params:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world_size
            for p, g in zip(params, flat.split([g.numel() for g in grads])):
                p.grad = g.view_as(p).clone()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _device(cfg: Config, local_rank: int) -> torch.device:
    name = cfg.device
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", name, "a device present here: no CUDA device is visible (use auto or cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", name, "a device present here: MPS is not available (use auto or cpu)")
    return device


def _precision(cfg: Config, device: torch.device) -> str:
    if cfg.precision != "auto":
        if cfg.precision == "fp16" and device.type == "cpu":
            raise ConfigError("precision", "fp16", "fp32 or bf16 on the CPU (fp16 autocast needs a GPU)")
        if cfg.precision == "fp64" and device.type != "cpu":
            raise ConfigError("precision", "fp64", f"auto, fp32, bf16 or fp16 on {device.type} (fp64 runs on the "
                                                   "CPU only: add --device cpu)")
        return cfg.precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"  # the thesis trained with mixed precision on
    return "fp32"


def _threads(cfg: Config, rank: int) -> int:
    """``threads``, capped (with one line) at the cores this process may use; unset: :func:`default_threads`."""
    if cfg.threads is None:
        return default_threads()
    cores = available_cores()
    if cfg.threads <= cores:
        return cfg.threads
    if rank == 0 and not cfg.quiet:
        say("threads: --threads %d is more than the %d cores this process may use (its affinity and CPU quota); "
            "using %d", cfg.threads, cores, cores)
    return cores


def resolve_runtime(cfg: Config, problem: UserError | None = None) -> Runtime:
    """Resolve device, precision and (under torchrun) the process group for this process.

    Under torchrun every rank then checks that it holds rank 0's resolved config; ``problem``: this rank's
    input was refused (``cfg`` is then a stand-in), and every rank stops with that one line."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(cfg, local_rank)
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if world > 1:
        try:
            agree("config", {k: v for k, v in cfg.to_dict().items() if k not in MACHINE_KEYS}, problem)
        except UserError:
            if owns_group:
                dist.destroy_process_group()
            raise
    elif problem is not None:
        raise problem
    torch.set_num_threads(_threads(cfg, rank))  # the cores free to this run
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.batch_size % world:
        raise ConfigError("batch_size", cfg.batch_size, f"a multiple of the {world} processes")
    return Runtime(device, _precision(cfg, device), rank, world, local_rank, owns_group)


def stop_every_rank(problem: UserError) -> None:
    """Under torchrun, a rank whose input was refused joins the process group and stops every rank with its
    line (:func:`resolve_runtime` with a stand-in config raises it); a no-op on one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        resolve_runtime(Config(), problem)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(seed: int, *names: object) -> int:
    """A seed for a named part of a run (e.g. student 2), stable across processes and Python versions."""
    import hashlib

    digest = hashlib.sha256(repr((seed, *names)).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def rng_state() -> dict[str, Any]:
    """Every generator's state (Python, NumPy, torch, CUDA) in a form ``torch.load(weights_only=True)`` reads."""
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    state: dict[str, Any] = {
        "python": random.getstate(), "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
