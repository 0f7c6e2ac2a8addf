"""Teacher-output store: a frozen teacher's logits on every view, computed by the first run, read by the rest.

A sweep trains many students (seeds, algorithms, α, T, resolutions) against one frozen teacher on
the same data. Every sample's training view is a pure function of ``(data seed, epoch, index)``
(:mod:`distillistic.data.augment`), so the teacher's logits on it are too: the first run records them,
every later run that shares teacher, data, transform and data seed reads them and never runs the
teacher (Shen & Xing 2022, "A Fast Knowledge Distillation Framework", stores them the same way).
Runs share an entry only when they fix the data seed (``--data-seed``): it defaults to ``--seed``.

Layout of ``<root>`` (``<cache_dir>/teacher-store`` by default, ``--teacher-store DIR``)::

    <entry>/manifest.json                       teacher (arch, sha256 of its weights), data (checksum and
                                                a fingerprint of every split), teacher view, precision
    <entry>/val.safetensors, test.safetensors   logits on the evaluation views (no augmentation)
    <entry>/train-<views>/manifest.json         training transform (augmentation, crops) and data seed
    <entry>/train-<views>/epoch-0000.safetensors

``<entry>`` and ``<views>`` are hashes of their manifests, so a run with another teacher, other data
or another transform lands in another folder and never reads these files. Each file holds, for the
``N`` samples of its split, ``covered`` (bool ``[N]``) and either

* all ``K`` logits as float32 ``[N, K]`` (float64 for an fp64 run) when ``K <= FULL_MAX_CLASSES`` (exact: a
  run reading them computes the same losses, bit for bit, as one computing the teacher), or
* the ``TOP_K`` largest logits (float16 ``[N, k]``), their class indices and the mean of the other
  ``K - k`` logits, which stand in for them when read (an approximation; ImageNet-sized ``K``).

Its metadata repeats the full key and a CRC-32 of the tensors: a file that is truncated, corrupt,
of the wrong shape or written for another key is never used; it is reported with a warning,
recomputed and rewritten. A file is written (to a temporary name, then renamed, under a lock) once
its epoch's samples are all recorded, so readers only see complete epochs and two processes of a
sweep may fill the same entry. It is written by :meth:`TeacherStore.flush`, which the loop calls at the
end of each epoch and of each evaluation, never from inside a training step. Under ``torchrun`` each rank
records the samples of its own shard and writes a file once they are all there, merged under the lock
with what the other ranks wrote: no key names the world size, so a later run on any number of processes
reads what an earlier one recorded (the lock is ``flock``: on several nodes the store folder must be on a
file system that honours it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from torch import Tensor

from distillistic.config import Config, cache_dir
from distillistic.core.signals import StepInputs, Teacher
from distillistic.data.loader import DataBundle, Loader, split_fingerprint
from distillistic.data.views import ViewMaker
from distillistic.errors import UserError, shown
from distillistic.locks import wait_lock
from distillistic.training.checkpoint import atomic_write, atomic_write_json, remove_stale_temporaries

if TYPE_CHECKING:
    from distillistic.training.runtime import Runtime

log = logging.getLogger("distillistic")

FORMAT = "distillistic-teacher-store"
FORMAT_VERSION = 1
FULL_MAX_CLASSES = 128
TOP_K = 32


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Codec:
    """How logits ``[B, K]`` are kept: all of them, or the top ``k`` and the mean of the rest; in float32, or in
    float64 for an fp64 run (so that a run reading them computes what the run that filled them did)."""

    num_classes: int
    dtype: torch.dtype = torch.float32

    @property
    def top_k(self) -> int | None:
        return None if self.num_classes <= FULL_MAX_CLASSES else TOP_K

    def describe(self) -> dict[str, Any]:
        full = str(self.dtype).removeprefix("torch.")
        if self.top_k is None:
            return {"kind": "logits", "dtype": full, "classes": self.num_classes}
        return {"kind": "top-k logits + mean of the rest", "k": self.top_k, "dtype": "float16",
                "classes": self.num_classes, **({"rest_dtype": full} if self.dtype != torch.float32 else {})}

    def empty(self, n: int, device: torch.device) -> dict[str, Tensor]:
        """Zeroed storage for ``n`` samples."""
        k = self.top_k
        if k is None:
            return {"logits": torch.zeros(n, self.num_classes, device=device, dtype=self.dtype)}
        index_dtype = torch.int16 if self.num_classes <= torch.iinfo(torch.int16).max else torch.int32
        return {"values": torch.zeros(n, k, device=device, dtype=torch.float16),
                "indices": torch.zeros(n, k, device=device, dtype=index_dtype),
                "rest": torch.zeros(n, device=device, dtype=self.dtype)}

    def encode(self, logits: Tensor) -> dict[str, Tensor]:
        """``[B, K]`` float logits -> the stored parts (``[B, ...]`` each)."""
        k = self.top_k
        if k is None:
            return {"logits": logits.to(self.dtype)}
        top = logits.to(self.dtype).topk(k, dim=1)
        rest = (logits.to(self.dtype).sum(dim=1) - top.values.sum(dim=1)) / (self.num_classes - k)
        index_dtype = self.empty(0, logits.device)["indices"].dtype
        return {"values": top.values.half(), "indices": top.indices.to(index_dtype), "rest": rest}

    def decode(self, parts: dict[str, Tensor]) -> Tensor:
        """The stored parts of ``B`` samples -> logits ``[B, K]`` (float32, or float64 for an fp64 run)."""
        if self.top_k is None:
            return parts["logits"]
        rest = parts["rest"]
        logits = rest[:, None].expand(len(rest), self.num_classes).clone()
        return logits.scatter_(1, parts["indices"].long(), parts["values"].to(self.dtype))

    def check(self, parts: dict[str, Tensor], n: int) -> str | None:
        """Why stored parts do not fit ``n`` samples, or None."""
        expected = self.empty(n, torch.device("cpu"))
        if set(parts) != set(expected):
            return f"holds {sorted(parts)} instead of {sorted(expected)}"
        for name, want in expected.items():
            got = parts[name]
            if got.shape != want.shape or got.dtype != want.dtype:
                return f"'{name}' is {got.dtype} {tuple(got.shape)}, expected {want.dtype} {tuple(want.shape)}"
        return None


@dataclass
class _Outputs:
    """One split's outputs for one epoch: ``parts`` on the device, ``covered`` ``[N]`` on the host."""

    parts: dict[str, Tensor]
    covered: Tensor

    def copy(self) -> _Outputs:
        return _Outputs({k: v.clone() for k, v in self.parts.items()}, self.covered.clone())


def _crc(tensors: dict[str, Tensor]) -> str:
    crc = 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().data, crc)
    return f"{crc:08x}"


class TeacherStore:
    """One entry of the store, read and filled by one run (implements ``signals.TeacherOutputs``)."""

    def __init__(self, folder: Path, entry: dict[str, Any], views: dict[str, Any], codec: Codec,
                 loaders: dict[str, Loader], device: torch.device) -> None:
        self.folder, self.entry, self.views, self.codec = folder, entry, views, codec
        self.train_folder = folder / f"train-{_digest(views)}"
        self.samplers = {split: loader.sampler for split, loader in loaders.items()}
        self.device = device
        # batches / files; train_misses: the training batches the teacher had to compute (training.costs)
        self.stats = {"hits": 0, "misses": 0, "written": 0, "rebuilt": 0, "train_misses": 0}
        self._stored: dict[str, tuple[int, _Outputs | None]] = {}  # split -> (epoch, what its file holds)
        self._pending: dict[str, tuple[int, _Outputs]] = {}  # split -> (epoch, outputs being recorded)
        self._complete: list[tuple[str, int, _Outputs]] = []  # recorded epochs whose file flush() writes
        self._plans: dict[str, tuple[int, Tensor]] = {}  # split -> (epoch, the samples it visits)
        self._check_manifest(folder / "manifest.json", entry, "*.safetensors")
        self._check_manifest(self.train_folder / "manifest.json", views, "epoch-*.safetensors")
        for where in (folder, self.train_folder):  # left by a writer killed before its rename
            for tmp in remove_stale_temporaries(where):
                log.info("teacher store: removed %s, an unfinished write of a process that was stopped", tmp)

    # --- the TeacherOutputs protocol -------------------------------------------------------------------

    def fetch(self, inp: StepInputs) -> Tensor | None:
        assert inp.index is not None, "the store needs the batch's sample indices"
        stored = self._load(inp.split, self._epoch(inp))
        if stored is None or not bool(stored.covered[inp.index].all()):
            self.stats["misses"] += 1
            self.stats["train_misses"] += inp.split == "train"
            return None
        self.stats["hits"] += 1
        index = inp.index.to(self.device, non_blocking=True)
        return self.codec.decode({k: v.index_select(0, index) for k, v in stored.parts.items()})

    def record(self, inp: StepInputs, logits: Tensor) -> None:
        assert inp.index is not None, "the store needs the batch's sample indices"
        split, epoch = inp.split, self._epoch(inp)
        pending = self._pending.get(split)
        if pending is None or pending[0] != epoch:  # an unfinished epoch before this one is dropped
            stored = self._load(split, epoch)
            n = len(self.samplers[split].labels)
            start = stored.copy() if stored is not None else _Outputs(
                self.codec.empty(n, self.device), torch.zeros(n, dtype=torch.bool))
            pending = self._pending[split] = (epoch, start)
        outputs = pending[1]
        index = inp.index.to(self.device, non_blocking=True)
        for name, part in self.codec.encode(logits.detach()).items():
            outputs.parts[name].index_copy_(0, index, part)
        outputs.covered[inp.index] = True
        if bool(outputs.covered[self._planned(split, epoch)].all()):  # every sample this epoch visits
            self._complete.append((split, epoch, outputs))  # its file is written by flush(), outside the step
            self._stored[split] = (epoch, outputs)
            del self._pending[split]

    def flush(self) -> None:
        """Write the file of every epoch recorded completely since the last flush (the loop calls this at the end
        of an epoch and of an evaluation, outside any training step)."""
        complete, self._complete = self._complete, []
        for split, epoch, outputs in complete:
            self._write(split, epoch, outputs)

    # --- files -------------------------------------------------------------------------------------------

    def path(self, split: str, epoch: int) -> Path:
        if split == "train":
            return self.train_folder / f"epoch-{epoch:04d}.safetensors"
        return self.folder / f"{split}.safetensors"

    def stored_epochs(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.train_folder.glob("epoch-*.safetensors"))

    @staticmethod
    def _epoch(inp: StepInputs) -> int:
        return inp.epoch if inp.split == "train" else 0  # evaluation views do not change with the epoch

    def _planned(self, split: str, epoch: int) -> Tensor:
        """Indices of the samples an epoch visits (the ragged tail that training drops is not)."""
        plan = self._plans.get(split)
        if plan is None or plan[0] != epoch:  # drawn once per epoch, not at every recorded step
            sampler = self.samplers[split]
            plan = self._plans[split] = (epoch, sampler.order(epoch)[: len(sampler) * sampler.batch_size])
        return plan[1]

    def _file_key(self, split: str, epoch: int) -> str:
        key = {"format": FORMAT_VERSION, "entry": self.entry, "split": split, "codec": self.codec.describe(),
               "samples": len(self.samplers[split].labels)}
        if split == "train":
            key |= {"views": self.views, "epoch": epoch}
        return json.dumps(key, sort_keys=True)

    def _load(self, split: str, epoch: int) -> _Outputs | None:
        """What the file of ``(split, epoch)`` holds (read once per epoch), or None."""
        cached = self._stored.get(split)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        outputs = self._read(split, epoch, warn=True)
        self._stored[split] = (epoch, outputs)
        return outputs

    def _read(self, split: str, epoch: int, warn: bool) -> _Outputs | None:
        path = self.path(split, epoch)
        if not path.is_file():
            return None
        n = len(self.samplers[split].labels)
        try:
            data = path.read_bytes()
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
            tensors = safetensors.torch.load(data)
        except Exception as e:  # a damaged file raises anything from OSError to SafetensorError
            reason = f"unreadable: {type(e).__name__}: {e}"
        else:
            covered = tensors.pop("covered", None)
            if meta.get("format") != FORMAT or meta.get("key") != self._file_key(split, epoch):
                reason = "written for another teacher, data, transform or format"
            elif meta.get("crc32") != _crc({**tensors, **({"covered": covered} if covered is not None else {})}):
                reason = "its contents do not match their checksum"
            elif covered is None or covered.dtype != torch.bool or covered.shape != (n,):
                reason = f"'covered' is missing or not bool [{n}]"
            else:
                reason = self.codec.check(tensors, n) or ""
                if not reason:
                    return _Outputs({k: v.to(self.device) for k, v in tensors.items()}, covered)
        if warn:
            self.stats["rebuilt"] += 1
            log.warning("teacher store: '%s' is damaged or does not belong here (%s); the teacher recomputes "
                        "these outputs and the file is rewritten", path, reason)
        return None

    def _write(self, split: str, epoch: int, outputs: _Outputs) -> None:
        with self._lock():
            # Another process may have completed this file meanwhile: keep the samples only it has.
            theirs = self._read(split, epoch, warn=False)
            if theirs is not None:
                extra = theirs.covered & ~outputs.covered
                if bool(extra.any()):
                    rows = extra.nonzero().flatten().to(self.device)
                    for name, part in outputs.parts.items():
                        part.index_copy_(0, rows, theirs.parts[name].index_select(0, rows))
                    outputs.covered |= extra
            tensors = {k: v.cpu() for k, v in outputs.parts.items()} | {"covered": outputs.covered}
            meta = {"format": FORMAT, "key": self._file_key(split, epoch), "crc32": _crc(tensors)}
            atomic_write(self.path(split, epoch), safetensors.torch.save(tensors, meta))
        self.stats["written"] += 1

    @contextmanager
    def _lock(self) -> Iterator[None]:
        path = self.folder / ".lock"
        with path.open("a") as f:
            wait_lock(f, path, f"the teacher store '{self.folder}', in use by another process")
            yield

    def _check_manifest(self, path: Path, expected: dict[str, Any], pattern: str) -> None:
        """Create a folder's manifest, or check it: a folder holding something else is emptied first."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock():
            if path.is_file():
                try:
                    if json.loads(path.read_text()) == expected:
                        return
                    reason = "it describes another teacher, data or transform"
                except (OSError, ValueError) as e:
                    reason = f"unreadable: {e}"
                stale = list(path.parent.glob(pattern))
                log.warning("teacher store: '%s' does not match this run (%s); its %d file(s) are removed and "
                            "rebuilt", path, reason, len(stale))
                self.stats["rebuilt"] += len(stale)
                for p in stale:
                    p.unlink(missing_ok=True)
            atomic_write_json(path, expected)


def store_root(cfg: Config) -> Path:
    return cache_dir(cfg) / "teacher-store" if cfg.teacher_store == "auto" else Path(cfg.teacher_store).expanduser()


def open_store(cfg: Config, bundle: DataBundle, teacher: Teacher, teacher_sha256: str, loaders: dict[str, Loader],
               views: ViewMaker, rt: Runtime) -> TeacherStore | None:
    """The store entry of this run's teacher (``teacher_sha256``:
    :func:`~distillistic.fileio.state_dict_hash` of its weights), data, transform and data seed;
    None when the store is off."""
    if cfg.teacher_store == "off":
        return None
    root = store_root(cfg)
    if root.exists() and not root.is_dir():
        raise UserError(f"--teacher-store '{root}' is a file; pass a folder, auto or off")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--teacher-store '{root}' cannot be created ({e}); choose a writable folder or pass "
                        "--no-teacher-store") from None
    info = bundle.info
    entry = {
        "format": FORMAT_VERSION,
        "teacher": {"arch": cfg.teacher_arch, "weights_sha256": teacher_sha256},
        "data": {"dataset": info.dataset, "checksum": info.checksum, "num_classes": info.num_classes,
                 "splits": {name: split_fingerprint(src) for name, src in sorted(bundle.splits.items())}},
        "view": {"size": teacher.view_size or info.image_size, "channels": teacher.channels,
                 "loader": loaders["val"].describe(), "mean": views.describe()["mean"],
                 "std": views.describe()["std"], "downscale": views.describe()["downscale"]},
        "precision": rt.precision,
    }
    if teacher.norm is not None:  # a teacher that reads its view normalised its own way (a timm model)
        entry["view"]["norm"] = [list(teacher.norm[0]), list(teacher.norm[1])]  # type: ignore[index]
    if cfg.teacher_calibration != "none":  # the stored logits are t / T_cal
        entry["teacher_calibration"] = {"method": cfg.teacher_calibration, "temperature": teacher.calibration_t}
    train_views = {"loader": loaders["train"].describe(), "views": views.describe(), "data_seed": cfg.data_seed}
    folder = root / f"{cfg.teacher_arch}-{_digest(entry)}"
    store = TeacherStore(folder, entry, train_views, Codec(info.num_classes, rt.dtype), loaders, rt.device)
    epochs = store.stored_epochs()
    log.info("teacher store: %s (%s)", shown(store.train_folder),
             f"{len(epochs)} epoch(s) stored" if epochs else "empty: this run fills it")
    return store
