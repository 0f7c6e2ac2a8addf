"""Bad inputs to the CLI and the one-line messages they get: the cases behind docs/bad-inputs.md.

Each case builds what it needs in a scratch folder (``TMP``) next to a copy of a finished run
(``RUN``), and returns the CLI's arguments. :func:`run_case` runs ``distillistic.cli.main`` on them
in this process, capturing everything that would reach stderr (the error line, log records,
warnings). ``tests/test_bad_inputs.py`` checks every case (exit code 2, one line, no traceback,
``RUN`` byte-identical afterwards, the message equal to the table's); running this file rewrites the
table from the real messages::

    PYTHONPATH=src python tests/bad_inputs.py
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import logging
import os
import pickle
import re
import shlex
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
# A tiny run on synthetic data: 10 classes, 1 channel, 8x8 px.
TINY = ["--dataset", "synthetic", "--synthetic-samples", "96", "--image-size", "8", "--model", "mlp", "--epochs", "1",
        "--batch-size", "16", "--device", "cpu", "--no-tensorboard", "--no-progress"]


@dataclass
class Workspace:
    tmp: Path  # scratch folder of this case
    run: Path  # a finished run; every case must leave it byte-identical

    def train(self, *args: str, out: Path | None = None, resume: bool = False) -> list[str]:
        """``train`` on the tiny synthetic data with ``args``, writing over RUN (so a late failure would show)."""
        out_args = ["--out", str(out or self.run), "--resume" if resume else "--overwrite"]
        return ["train", *TINY, *args, *out_args]

    def state_dict(self, name: str, arch: str = "mlp", classes: int = 10, channels: int = 1, **extra: object) -> Path:
        from distillistic.models.builders import build_model

        path = self.tmp / name
        torch.save({**build_model(arch, classes, channels, 8).state_dict(), **extra}, path)
        return path

    def idx_folder(self, name: str = "idx", n: int = 60, gz: bool = True) -> Path:
        folder = self.tmp / name
        folder.mkdir()
        rng = np.random.default_rng(0)
        write_idx(folder / f"t10k-images-idx3-ubyte{'.gz' if gz else ''}", rng.integers(0, 255, (n, 8, 8), np.uint8))
        write_idx(folder / f"t10k-labels-idx1-ubyte{'.gz' if gz else ''}", (np.arange(n) % 3).astype(np.uint8))
        return folder

    def image_folder(self, name: str = "images", per_class: int = 4) -> Path:
        from PIL import Image

        root = self.tmp / name
        rng = np.random.default_rng(0)
        for c in ("cat", "dog"):
            (root / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), np.uint8)).save(root / c / f"{i}.jpg")
        return root


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (uint8) as MNIST ships them, gzip'd when the name ends with .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


class Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, ("echo pwned",)


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # config value, flag, config file, data file, checkpoint, output directory, export, calibrate, predict
    what: str
    argv: Callable[[Workspace], list[str]]
    fashion_offline: bool = False  # point the Fashion-MNIST mirror at a folder that does not exist
    patch: Callable[[], contextlib.AbstractContextManager[object]] | None = None  # e.g. a disk that is full
    needs: str | None = None  # a module of an optional extra the case runs (skipped without it)


def _yaml(ws: Workspace, text: str) -> str:
    path = ws.tmp / "c.yaml"
    path.write_text(text)
    return str(path)


def _truncated_idx(ws: Workspace) -> list[str]:
    folder = ws.idx_folder(gz=False)
    images = folder / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    return ws.train("--dataset", "mnist", "--data-root", str(folder))


def _bad_gzip(ws: Workspace, truncate: bool) -> list[str]:
    folder = ws.idx_folder()
    images = folder / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:200] if truncate else b"\x1f\x8b\x08\x00garbage-not-deflate" * 4)
    return ws.train("--dataset", "mnist", "--data-root", str(folder))


def _idx_edit(ws: Workspace, edit: str) -> list[str]:
    folder = ws.idx_folder()
    if edit == "magic":
        (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x12\x34\x08\x03" + bytes(100)))
    elif edit == "no-labels":
        (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    elif edit == "count":
        write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(59, np.uint8))
    return ws.train("--dataset", "mnist", "--data-root", str(folder))


def _image_edit(ws: Workspace, edit: str) -> list[str]:
    root = ws.image_folder()
    image = root / "dog" / "2.jpg"
    if edit == "truncated":
        image.write_bytes(image.read_bytes()[: len(image.read_bytes()) // 2])
    elif edit == "empty":
        image.write_bytes(b"")
    elif edit == "no-images":
        for p in root.rglob("*.jpg"):
            p.write_bytes(b"")
            p.rename(p.with_suffix(".txt"))
    elif edit == "no-val":
        (root / "train").mkdir()
        for c in ("cat", "dog"):
            (root / c).rename(root / "train" / c)
    return ["train", "--dataset", "imagefolder", "--data-root", str(root), "--image-size", "8", "--model", "mlp",
            "--epochs", "1", "--device", "cpu", "--no-tensorboard", "--no-progress", "--num-workers", "0",
            "--split-fractions", "0.5,0.25,0.25", "--out", str(ws.run), "--overwrite"]


def _fashion_bad_md5(ws: Workspace) -> list[str]:
    from distillistic.data.datasets import FASHION_FILES

    folder = ws.tmp / "fashion"
    folder.mkdir()
    for name, _ in FASHION_FILES:
        (folder / name).write_bytes(gzip.compress(b"not fashion-mnist"))
    return ws.train("--dataset", "fashion-mnist", "--data-root", str(folder))


def _resume_with_checkpoint(ws: Workspace, make: Callable[[Path], None]) -> list[str]:
    make(ws.run / "checkpoints" / "last.pt")
    return ws.train(resume=True)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:5000])


def _malicious_file(path: Path) -> None:
    torch.save({"format": "distillistic-checkpoint", "version": 1, "models": Payload()}, path)


def _newer_version(path: Path) -> None:
    from distillistic.training.checkpoint import load

    obj = load(path)
    obj["version"] = 99
    torch.save(obj, path)


def _student_safetensors(ws: Workspace) -> list[str]:
    path = ws.tmp / "student.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return ws.train("--student-weights", str(path))


def _resume_partial(ws: Workspace) -> list[str]:
    out = ws.tmp / "partial"
    out.mkdir()
    (out / "config.yaml").write_text("algo: baseline\n")
    return ws.train(out=out, resume=True)


def _file(ws: Workspace, name: str, content: bytes = b"x") -> Path:
    path = ws.tmp / name
    path.write_bytes(content)
    return path


def _kd(ws: Workspace, weights: str, teacher: str = "mlp") -> list[str]:
    return ws.train("--algo", "kd", "--teacher", teacher, "--teacher-weights", weights)


def _feature(ws: Workspace, algo: str, *args: str, teacher: str = "cnn") -> list[str]:
    return ws.train("--algo", algo, "--teacher", teacher, "--teacher-weights", "random", *args)


CASES: list[Case] = [
    # --- config values ---------------------------------------------------------------------------
    Case("unknown-algo", "config value", "an unknown algorithm", lambda ws: ws.train("--algo", "kdd")),
    Case("unknown-dataset", "config value", "an unknown dataset", lambda ws: ws.train("--dataset", "cifar-10")),
    Case("unknown-model", "config value", "an unknown model", lambda ws: ws.train("--model", "resnet19")),
    Case("unknown-teacher", "config value", "an unknown teacher model",
         lambda ws: ws.train("--algo", "kd", "--teacher", "resnet500")),
    Case("epochs-zero", "config value", "zero epochs", lambda ws: ws.train("--epochs", "0")),
    Case("milestones-without-multistep", "config value", "milestones with another schedule",
         lambda ws: ws.train("--milestones", "150,180")),
    Case("nesterov-adamw", "config value", "Nesterov momentum with AdamW", lambda ws: ws.train("--nesterov")),
    Case("batch-negative", "config value", "a negative batch size", lambda ws: ws.train("--batch-size", "-8")),
    Case("lr-zero", "config value", "a learning rate of 0", lambda ws: ws.train("--lr", "0")),
    Case("lr-nan", "config value", "a learning rate of NaN", lambda ws: ws.train("--lr", "nan")),
    Case("epochs-text", "config value", "a word where a number is expected", lambda ws: ws.train("--epochs", "two")),
    Case("epochs-fraction", "config value", "a fraction where a whole number is expected",
         lambda ws: ws.train("--epochs", "2.5")),
    Case("epochs-huge", "config value", "a number beyond 64 bits", lambda ws: ws.train("--epochs", "1e30")),
    Case("alpha-range", "config value", "alpha outside [0, 1]",
         lambda ws: ws.train("--algo", "tfkd", "--alpha", "1.5")),
    Case("alpha-ignored", "config value", "alpha for a method that weighs its own terms (dkd)",
         lambda ws: ws.train("--algo", "dkd", "--teacher", "mlp", "--teacher-weights", "random", "--alpha", "0.5")),
    Case("temperature-zero", "config value", "a temperature of 0",
         lambda ws: ws.train("--algo", "tfkd", "--temperature", "0")),
    Case("dml-one-student", "config value", "DML with one student",
         lambda ws: ws.train("--algo", "dml", "--students", "1")),
    Case("ema-range", "config value", "an EMA decay outside (0, 1)", lambda ws: ws.train("--ema", "1")),
    Case("ban-zero-generations", "config value", "born-again networks with 0 generations",
         lambda ws: ws.train("--algo", "ban", "--generations", "0")),
    Case("pcl-with-ema", "config value", "--ema with pcl, which keeps EMA copies already",
         lambda ws: ws.train("--algo", "pcl", "--ema", "0.99")),
    Case("virtual-p-low", "config value", "Tf-KD's p not above 1/K (data-dependent)",
         lambda ws: ws.train("--algo", "tfkd", "--virtual-p", "0.05")),
    # logit-based methods
    Case("ls-eps-range", "config value", "a label smoothing outside [0, 1)",
         lambda ws: ws.train("--algo", "ls", "--label-smoothing", "1")),
    Case("dkd-beta-negative", "config value", "a negative DKD weight beta",
         lambda ws: ws.train("--algo", "dkd", "--dkd-beta", "-1")),
    Case("ls-kd-alpha-warmup", "config value", "an alpha warm-up for kd --logit-standardize, weighed 0.1·CE + 9·KD "
         "(no alpha)", lambda ws: ws.train("--algo", "kd", "--teacher", "mlp", "--teacher-weights", "random",
                                           "--logit-standardize", "--alpha-warmup", "0.2")),
    Case("dist-gamma-negative", "config value", "a negative DIST weight gamma",
         lambda ws: ws.train("--algo", "dist", "--dist-gamma", "-0.5")),
    Case("ctkd-temperature", "config value", "a fixed temperature for CTKD, whose temperature is learned",
         lambda ws: ws.train("--algo", "ctkd", "--teacher", "mlp", "--teacher-weights", "random",
                             "--temperature", "4")),
    Case("tfkd-self-other-teacher", "config value", "Tf-KD self-training taught by another architecture "
         "(data-dependent)", lambda ws: ws.train("--algo", "tfkd_self", "--teacher", "cnn_wide")),
    Case("kdcl-one-student", "config value", "KDCL with one student",
         lambda ws: ws.train("--algo", "kdcl", "--students", "1")),
    Case("peer-views-no-cohort", "config value", "independent views for a method without a cohort",
         lambda ws: ws.train("--peer-views", "independent")),
    Case("peer-views-no-augment", "config value", "independent views of in-memory data without augmentation "
         "(data-dependent)", lambda ws: ws.train("--algo", "kdcl", "--peer-views", "independent")),
    Case("standardize-no-logits", "config value", "logit standardisation for a method without a logit signal",
         lambda ws: ws.train("--algo", "tfkd", "--logit-standardize")),
    Case("resolution-too-large", "config value", "a student resolution above the input size",
         lambda ws: ws.train("--student-resolution", "16")),
    Case("imbalance-class", "config value", "an imbalanced class index beyond the classes",
         lambda ws: ws.train("--imbalance-class", "12")),
    Case("optimizer-choice", "config value", "an unknown optimizer", lambda ws: ws.train("--optimizer", "adam")),
    Case("dot-optimizer", "config value", "an explicit --optimizer other than DOT's own (a form of SGD)",
         lambda ws: ws.train("--algo", "dot", "--teacher", "mlp", "--teacher-weights", "random",
                             "--optimizer", "adamw")),
    Case("data-root-unread", "config value", "--data-root for a dataset that reads no folder (synthetic)",
         lambda ws: ws.train("--data-root", str(ws.tmp))),
    Case("device-unknown", "config value", "an unknown device", lambda ws: ws.train("--device", "tpu")),
    Case("fp16-on-cpu", "config value", "fp16 on the CPU", lambda ws: ws.train("--precision", "fp16")),
    Case("split-fractions", "config value", "split fractions not summing to 1",
         lambda ws: ws.train("--split-fractions", "0.5,0.5,0.5")),
    Case("seed-negative", "config value", "a negative seed", lambda ws: ws.train("--seed", "-1")),
    # --- flags -----------------------------------------------------------------------------------
    Case("flag-unknown", "flag", "a misspelt flag", lambda ws: ws.train("--epocs", "3")),
    Case("flag-no-value", "flag", "a flag without its value", lambda ws: [*ws.train(), "--lr"]),
    Case("flag-bool-value", "flag", "a value given to an on/off flag", lambda ws: ws.train("--resume=yes")),
    Case("no-out", "flag", "no output directory", lambda ws: ["train", *TINY]),
    Case("set-no-equals", "flag", "--set without key=value", lambda ws: ws.train("--set", "lr")),
    Case("set-unknown-key", "flag", "--set of an unknown key", lambda ws: ws.train("--set", "lrr=0.1")),
    Case("subcommand-unknown", "flag", "an unknown command", lambda ws: ["trian", "--out", str(ws.run)]),
    # --- config files ----------------------------------------------------------------------------
    Case("yaml-missing", "config file", "a config file that does not exist",
         lambda ws: ws.train(str(ws.tmp / "nope.yaml"))),
    Case("yaml-syntax", "config file", "a config file with broken YAML",
         lambda ws: ws.train(_yaml(ws, "epochs: 3\nlr: [0.1\n"))),
    Case("yaml-list", "config file", "a config file holding a list",
         lambda ws: ws.train(_yaml(ws, "- epochs\n- 3\n"))),
    Case("yaml-unknown-key", "config file", "an unknown key in a config file",
         lambda ws: ws.train(_yaml(ws, "epochs: 3\nlearning_rate: 0.1\n"))),
    Case("yaml-wrong-type", "config file", "a nested mapping as a value",
         lambda ws: ws.train(_yaml(ws, "batch_size: {train: 32}\n"))),
    Case("yaml-python-tag", "config file", "a YAML tag that would run code",
         lambda ws: ws.train(_yaml(ws, "epochs: !!python/object/apply:os.system ['echo pwned']\n"))),
    # --- data files ------------------------------------------------------------------------------
    Case("data-missing", "data file", "a data folder that does not exist",
         lambda ws: ws.train("--dataset", "mnist", "--data-root", str(ws.tmp / "nowhere"))),
    Case("idx-none", "data file", "a folder without IDX files",
         lambda ws: ws.train("--dataset", "mnist", "--data-root", str(ws.tmp))),
    Case("idx-truncated", "data file", "a truncated IDX file", _truncated_idx),
    Case("gzip-corrupt", "data file", "a corrupt gzip file", lambda ws: _bad_gzip(ws, truncate=False)),
    Case("gzip-truncated", "data file", "a truncated gzip file", lambda ws: _bad_gzip(ws, truncate=True)),
    Case("idx-magic", "data file", "an IDX file with a wrong magic number", lambda ws: _idx_edit(ws, "magic")),
    Case("idx-no-labels", "data file", "IDX images without their labels file", lambda ws: _idx_edit(ws, "no-labels")),
    Case("idx-count", "data file", "IDX images and labels of different lengths", lambda ws: _idx_edit(ws, "count")),
    Case("images-none", "data file", "an image folder with no images", lambda ws: _image_edit(ws, "no-images")),
    Case("jpeg-truncated", "data file", "a truncated JPEG in an image folder", lambda ws: _image_edit(ws, "truncated")),
    Case("image-empty", "data file", "an empty image file", lambda ws: _image_edit(ws, "empty")),
    Case("imagefolder-no-val", "data file", "an image folder with train/ but no val/",
         lambda ws: _image_edit(ws, "no-val")),
    Case("fashion-md5", "data file", "a Fashion-MNIST file with the wrong md5", _fashion_bad_md5),
    Case("fashion-offline", "data file", "Fashion-MNIST missing and no download possible",
         lambda ws: ws.train("--dataset", "fashion-mnist", "--data-root", str(ws.tmp / "fmnist")),
         fashion_offline=True),
    # --- checkpoints -----------------------------------------------------------------------------
    Case("resume-nothing", "checkpoint", "--resume on a run that never wrote a checkpoint", _resume_partial),
    Case("resume-other-config", "checkpoint", "--resume with other settings",
         lambda ws: ws.train("--lr", "0.01", resume=True)),
    Case("resume-truncated", "checkpoint", "--resume from a truncated last.pt",
         lambda ws: _resume_with_checkpoint(ws, _truncate)),
    Case("resume-malicious", "checkpoint", "--resume from a last.pt carrying a malicious pickle",
         lambda ws: _resume_with_checkpoint(ws, _malicious_file)),
    Case("resume-newer", "checkpoint", "--resume from a checkpoint of a newer format",
         lambda ws: _resume_with_checkpoint(ws, _newer_version)),
    Case("teacher-missing", "checkpoint", "teacher weights that do not exist",
         lambda ws: _kd(ws, str(ws.tmp / "teacher.pt"))),
    Case("teacher-not-torch", "checkpoint", "teacher weights that are not a PyTorch file",
         lambda ws: _kd(ws, str(_file(ws, "teacher.pt", b"just text")))),
    Case("teacher-malicious", "checkpoint", "teacher weights carrying a malicious pickle",
         lambda ws: _kd(ws, str(_file(ws, "teacher.pt", pickle.dumps({"w": Payload()}, protocol=2))))),
    Case("teacher-classes", "checkpoint", "a teacher trained on another class count",
         lambda ws: _kd(ws, str(ws.state_dict("teacher.pt", classes=100)))),
    Case("teacher-arch", "checkpoint", "a teacher of another architecture (plain state dict)",
         lambda ws: _kd(ws, str(ws.state_dict("teacher.pt", arch="cnn")))),
    Case("teacher-arch-run", "checkpoint", "a run directory whose model is not --teacher",
         lambda ws: _kd(ws, str(ws.run), teacher="cnn")),
    Case("teacher-channels", "checkpoint", "a teacher for 3-channel images on 1-channel data",
         lambda ws: _kd(ws, str(ws.state_dict("teacher.pt", arch="cnn", channels=3)), teacher="cnn")),
    Case("student-classes", "checkpoint", "student weights with another class count",
         lambda ws: ws.train("--student-weights", str(ws.state_dict("s.pt", classes=5)))),
    Case("student-safetensors", "checkpoint", "a damaged .safetensors file", _student_safetensors),
    Case("student-not-state-dict", "checkpoint", "a PyTorch file that is not a state dict",
         lambda ws: ws.train("--student-weights", str(_torch_file(ws, "s.pt", {"epoch": 3, "note": "hi"})))),
    # --- feature distillation: stages ------------------------------------------------------------
    Case("feature-stage-unknown", "config value", "a feature stage the teacher does not have",
         lambda ws: _feature(ws, "fitnet", "--hint-stage", "stage9")),
    Case("feature-student-no-stage", "config value", "a feature stage the student (mlp) does not have",
         lambda ws: _feature(ws, "sp", "--sp-stage", "stage2")),
    Case("feature-teacher-no-taps", "config value", "a feature method with a teacher that declares no stages",
         lambda ws: _feature(ws, "rkd", "--image-size", "32", teacher="densenet121")),
    # --- output directories ----------------------------------------------------------------------
    Case("out-is-file", "output directory", "--out naming a file",
         lambda ws: ws.train(out=_file(ws, "out.txt"))[:-1]),
    Case("out-occupied", "output directory", "--out holding another run (no --overwrite / --resume)",
         lambda ws: ws.train()[:-1]),
    Case("out-under-file", "output directory", "--out inside a file",
         lambda ws: ws.train(out=_file(ws, "f.txt") / "run")[:-1]),
    # --- export ----------------------------------------------------------------------------------
    Case("export-not-dir", "export", "export of a path that is not a directory",
         lambda ws: ["export", str(ws.tmp / "nowhere")]),
    Case("export-no-checkpoints", "export", "export of a folder without checkpoints",
         lambda ws: ["export", str(ws.tmp)]),
    Case("export-exists", "export", "export over files that exist",
         lambda ws: ["export", str(ws.run), "--out", str(_file(ws, "student.safetensors").parent)]),
    # --- calibrate -------------------------------------------------------------------------------
    Case("calibrate-no-checkpoints", "calibrate", "calibrate of a folder without checkpoints",
         lambda ws: ["calibrate", str(ws.tmp)]),
    Case("calibrate-unfinished", "calibrate", "calibrate of a run that did not finish",
         lambda ws: ["calibrate", str(_unfinished_run(ws))]),
    Case("calibrate-one-class-val", "calibrate", "calibrate of a run whose val split holds one class",
         lambda ws: ["calibrate", str(_one_class_val_run(ws))]),
]


def _unfinished_run(ws: Workspace) -> Path:
    """A copy of RUN whose summary says it was interrupted."""
    import json

    copy = ws.tmp / "unfinished"
    shutil.copytree(ws.run, copy)
    summary = json.loads((copy / "summary.json").read_text())
    (copy / "summary.json").write_text(json.dumps(summary | {"status": "interrupted"}))
    return copy


def _one_class_val_run(ws: Workspace) -> Path:
    """A finished run whose val split is one sample (so one class): 2% of 96 synthetic images."""
    from distillistic import cli

    out = ws.tmp / "one-class"
    argv = ["train", *TINY, "--split-fractions", "0.88,0.02,0.1", "--out", str(out)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(argv) == 0
    return out
# --- reliability: integrity, resume checks, locks, bounded inputs, OS failures, odd data -------

_HELD: list[object] = []  # lock files held open by a case (an in-process stand-in for a concurrent run)
BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]\n"
                                              for p, c in zip("abcdefg", "bcdefgh"))


def _flip_tensor_byte(path: Path) -> None:
    """One flipped byte inside the first tensor's data of a torch zip file (torch does not notice)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 16)
    raw = bytearray(path.read_bytes())
    at = info.header_offset + 30 + int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little")
    at += int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little") + 5
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


def _no_checksum(path: Path) -> None:
    obj = torch.load(path, weights_only=True)
    del obj["sha256"]
    torch.save(obj, path)


def _best(ws: Workspace) -> Path:
    return ws.run / "checkpoints" / "best-student.pt"


def _flipped_best(ws: Workspace) -> str:
    _flip_tensor_byte(_best(ws))
    return str(_best(ws))


def _resume_changed_data(ws: Workspace) -> list[str]:
    folder = ws.idx_folder(n=120)
    out = ws.tmp / "idx-run"
    argv = ws.train("--dataset", "mnist", "--data-root", str(folder), out=out)
    code, text = run_argv(argv)
    assert code == 0, text
    images = folder / "t10k-images-idx3-ubyte.gz"
    data = bytearray(gzip.decompress(images.read_bytes()))
    data[-1] ^= 0xFF  # one pixel changed since the run started
    images.write_bytes(gzip.compress(bytes(data)))
    return ws.train("--dataset", "mnist", "--data-root", str(folder), out=out, resume=True)


def _locked(ws: Workspace) -> list[str]:
    import fcntl

    f = (ws.run / ".lock").open("a")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.truncate(0)
    f.write('{"pid": 4242, "host": "gpu-node-7", "since": "2026-01-01T00:00:00+00:00", "command": '
            '"distillistic train --out RUN"}\n')  # the note another train on RUN leaves
    f.flush()
    _HELD.append(f)  # as another train on RUN, still running
    return ws.train()


def _dangling(ws: Workspace) -> list[str]:
    link = ws.tmp / "link"
    link.symlink_to(ws.tmp / "gone")
    return ws.train(out=link)


@contextlib.contextmanager
def _os_fails(code: int, op: str = "fsync") -> Iterator[None]:
    """Every write's fsync (or another os call) fails with ``code``: a full disk, a read-only file system."""
    saved = getattr(os, op)

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    setattr(os, op, fail)
    try:
        yield
    finally:
        setattr(os, op, saved)


def _fails(code: int, op: str = "fsync") -> Callable[[], contextlib.AbstractContextManager[None]]:
    return lambda: _os_fails(code, op)


def _idx_labels(ws: Workspace, labels: np.ndarray, code: int = 0x08) -> list[str]:
    folder = ws.idx_folder(n=len(labels))
    raw = bytes([0, 0, code, 1]) + len(labels).to_bytes(4, "big") + labels.astype(labels.dtype.newbyteorder(">")
                                                                                   ).tobytes()
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw))
    return ws.train("--dataset", "mnist", "--data-root", str(folder))


def _image_case(ws: Workspace, edit: str) -> list[str]:
    from PIL import Image

    root = ws.image_folder()
    if edit == "empty-class":
        (root / "emu").mkdir()
    elif edit == "16bit":
        Image.fromarray(np.full((12, 12), 40000, np.uint16)).save(root / "dog" / "wide.png")
    elif edit == "float":
        Image.fromarray(np.zeros((12, 12), np.float32)).save(root / "dog" / "float.tiff")
    elif edit == "bomb":
        import struct
        import zlib

        def chunk(kind: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

        ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)  # declares 1.6 billion pixels
        png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + \
            chunk(b"IEND", b"")
        (root / "dog" / "bomb.png").write_bytes(png)
    return ["train", "--dataset", "imagefolder", "--data-root", str(root), "--image-size", "8", "--model", "mlp",
            "--epochs", "1", "--device", "cpu", "--no-tensorboard", "--no-progress", "--num-workers", "0",
            "--split-fractions", "0.5,0.25,0.25", "--out", str(ws.run), "--overwrite"]


RELIABILITY_CASES: list[Case] = [
    Case("temperature-huge", "config value", "a temperature so large the softmax is uniform",
         lambda ws: ws.train("--algo", "tfkd", "--temperature", "5000")),
    Case("temperature-tiny", "config value", "a temperature so small the softmax overflows",
         lambda ws: ws.train("--algo", "tfkd", "--temperature", "0.001")),
    Case("yaml-alias-bomb", "config file", "a 300-byte YAML alias bomb (9**8 values once expanded)",
         lambda ws: ws.train(_yaml(ws, BOMB))),
    Case("yaml-too-deep", "config file", "a config file nested 30 levels deep",
         lambda ws: ws.train(_yaml(ws, "epochs: " + "[" * 30 + "]" * 30 + "\n"))),
    Case("yaml-too-large", "config file", "a config file over 1 MiB",
         lambda ws: ws.train(_yaml(ws, "# padding\n" * 120_000))),
    Case("yaml-not-utf8", "config file", "a config file that is not UTF-8 text",
         lambda ws: ws.train(str(_file(ws, "c.yaml", b"epochs: \xff\xfe3\n")))),
    Case("sweep-alias-bomb", "config file", "a sweep file that is a YAML alias bomb",
         lambda ws: ["sweep", _yaml(ws, BOMB), "--out", str(ws.tmp / "sweep")]),
    Case("resume-flipped-byte", "checkpoint", "--resume from a last.pt with one flipped byte in a tensor",
         lambda ws: _resume_with_checkpoint(ws, _flip_tensor_byte)),
    Case("resume-no-checksum", "checkpoint", "--resume from a last.pt whose checksum was removed",
         lambda ws: _resume_with_checkpoint(ws, _no_checksum)),
    Case("resume-missing", "checkpoint", "--resume of a folder that does not exist",
         lambda ws: ws.train(out=ws.tmp / "nowhere", resume=True)),
    Case("resume-data-changed", "checkpoint", "--resume after the data changed (one pixel)", _resume_changed_data),
    Case("teacher-run-flipped", "checkpoint", "a teacher run directory whose best weights have a flipped byte",
         lambda ws: (_flipped_best(ws), _kd(ws, str(ws.run)))[1]),
    Case("student-flipped", "checkpoint", "student weights (a best-*.pt) with a flipped byte",
         lambda ws: ws.train("--student-weights", _flipped_best(ws), out=ws.tmp / "s")),
    Case("export-flipped", "export", "export of a run whose best weights have a flipped byte",
         lambda ws: (_flipped_best(ws), ["export", str(ws.run), "--out", str(ws.tmp / "export")])[1]),
    Case("out-locked", "output directory", "--out in use by another train at the same time", _locked),
    Case("out-dangling-symlink", "output directory", "--out a symlink to a folder that does not exist", _dangling),
    Case("out-name-too-long", "output directory", "--out with a name longer than the file system allows",
         lambda ws: ws.train(out=ws.tmp / ("n" * 300))),
    Case("out-disk-full", "output directory", "the disk is full when the run starts writing",
         lambda ws: ws.train(out=ws.tmp / "out"), patch=_fails(errno.ENOSPC)),
    Case("out-quota", "output directory", "the disk quota is exceeded", lambda ws: ws.train(out=ws.tmp / "out"),
         patch=_fails(errno.EDQUOT)),
    Case("out-read-only", "output directory", "--out on a read-only file system",
         lambda ws: ws.train(out=ws.tmp / "out"), patch=_fails(errno.EROFS)),
    Case("out-permission", "output directory", "no permission to write in --out",
         lambda ws: ws.train(out=ws.tmp / "out"), patch=_fails(errno.EACCES)),
    Case("out-io-error", "output directory", "an I/O error from the disk", lambda ws: ws.train(out=ws.tmp / "out"),
         patch=_fails(errno.EIO)),
    Case("export-disk-full", "export", "the disk is full during an export",
         lambda ws: ["export", str(ws.run), "--out", str(ws.tmp / "export")], patch=_fails(errno.ENOSPC)),
    Case("report-disk-full", "report", "the disk is full while writing a report",
         lambda ws: ["report", str(ws.run), "--out", str(ws.tmp / "report")], patch=_fails(errno.ENOSPC)),
    Case("report-nothing", "report", "a report of folders holding only a malformed run",
         lambda ws: ["report", str(_malformed_run(ws)), "--out", str(ws.tmp / "report")]),
    Case("sweep-disk-full", "output directory", "the disk is full when a sweep starts",
         lambda ws: ["sweep", _yaml(ws, "dataset: synthetic\ngrid: {seed: [0, 1]}\n"), "--out",
                     str(ws.tmp / "sweep")], patch=_fails(errno.ENOSPC)),
    Case("idx-label-gap", "data file", "an IDX label outside the classes (200 among digits 0-2)",
         lambda ws: _idx_labels(ws, np.array([0, 1, 2] * 19 + [200, 1, 2], np.uint8))),
    Case("idx-label-negative", "data file", "a negative IDX label (signed byte type)",
         lambda ws: _idx_labels(ws, np.array([0, 1, 2] * 19 + [-1, 1, 2], np.int8), code=0x09)),
    Case("idx-label-float", "data file", "IDX labels stored as floats",
         lambda ws: _idx_labels(ws, np.array([0, 1, 2] * 20, np.float32), code=0x0D)),
    Case("images-empty-class", "data file", "a class folder with no images", lambda ws: _image_case(ws, "empty-class")),
    Case("image-16bit", "data file", "a 16-bit PNG in an image folder", lambda ws: _image_case(ws, "16bit")),
    Case("image-float", "data file", "a 32-bit float TIFF in an image folder", lambda ws: _image_case(ws, "float")),
    Case("image-bomb", "data file", "a PNG declaring 40000 x 40000 pixels (decompression bomb)",
         lambda ws: _image_case(ws, "bomb")),
]


@contextlib.contextmanager
def _memory(size: int) -> Iterator[None]:
    """A machine with ``size`` bytes of memory, as the model check sees it."""
    from distillistic.models import builders

    saved = builders.memory_bytes
    builders.memory_bytes = lambda: size
    try:
        yield
    finally:
        builders.memory_bytes = saved


def _malformed_run(ws: Workspace) -> Path:
    folder = ws.tmp / "runs" / "bad"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text('{"status": "completed", "models": {"student": {"test": {"top1": "x"}}}}')
    (folder / "config.yaml").write_text("algo: baseline\nseed: 0\n")
    return ws.tmp / "runs"


CASES += RELIABILITY_CASES

# Third round: self-training of cohorts, derived artefacts, numbers that overflow, the CIFAR reader, ranks.
ROUND3_CASES: list[Case] = [
    Case("tfkd-self-mixed-cohort", "config value", "Tf-KD self-training of students of several architectures",
         lambda ws: ws.train("--algo", "tfkd_self", "--students", "mlp,cnn")),
    Case("tfkd-self-listed-other-teacher", "config value", "Tf-KD self-training of a listed student (cnn) by "
         "another architecture (data-dependent)",
         lambda ws: ws.train("--algo", "tfkd_self", "--students", "cnn", "--model", "cnn", "--teacher", "mlp")),
    # numbers that overflow or exhaust
    Case("teacher-mix-overflow", "config value", "teacher mixing weights whose sum is not finite",
         lambda ws: ws.train("--algo", "kd", "--teacher", "mlp,cnn", "--teacher-weights", "random",
                             "--teacher-mix", "1e308,1e308")),
    Case("weights-overflow", "config value", "a method's loss weights whose sum is not finite (dkd)",
         lambda ws: ws.train("--algo", "dkd", "--teacher", "mlp", "--teacher-weights", "random", "--dkd-alpha",
                             "1e308", "--dkd-beta", "1e308")),
    Case("synthetic-classes-huge", "config value", "more synthetic classes than samples (10**12)",
         lambda ws: ws.train("--synthetic-classes", "1000000000000")),
    Case("synthetic-too-large", "config value", "synthetic data of 10**11 images (terabytes)",
         lambda ws: ws.train("--synthetic-samples", "100000000000")),
    Case("image-size-huge", "config value", "an image size of 100000 px",
         lambda ws: ws.train("--image-size", "100000")),
    Case("model-resolution", "config value", "a student that cannot read the image size (densenet121 at 8 px)",
         lambda ws: ws.train("--model", "densenet121")),
    Case("teacher-resolution", "config value", "a teacher that cannot read the image size (vgg8 at 4 px)",
         lambda ws: ws.train("--image-size", "4", "--algo", "kd", "--teacher", "vgg8", "--teacher-weights",
                             "random")),
    Case("model-exceeds-memory", "config value", "a model whose weights exceed the machine's memory (1 MiB here)",
         lambda ws: ws.train("--model", "resnet18"), patch=lambda: _memory(1 << 20)),
    Case("list-classes-huge", "flag", "list models for 10**12 classes",
         lambda ws: ["list", "models", "--num-classes", "1000000000000"]),
]
CASES += ROUND3_CASES

ODD_MODEL = """import torch

if not hasattr(torch.ops.dtest, "odd"):  # an operator the ONNX exporter has no translation for
    @torch.library.custom_op("dtest::odd", mutates_args=())
    def odd(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @odd.register_fake
    def _(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)


class Odd(torch.nn.Module):
    def __init__(self, num_classes: int, channels: int, size: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(channels * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.ops.dtest.odd(x.flatten(1)))


def build(num_classes: int, channels: int, size: int) -> torch.nn.Module:
    return Odd(num_classes, channels, size)
"""


def _odd_run(ws: Workspace) -> Path:
    """A finished run of a model with an operator the ONNX exporter cannot translate."""
    from distillistic import cli

    (ws.tmp / "odd_model.py").write_text(ODD_MODEL)
    out = ws.tmp / "odd"
    args = ws.train(out=out)
    args[args.index("mlp")] = f"{ws.tmp / 'odd_model.py'}:build"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(args) == 0
    return out


def _no_epoch(ws: Workspace) -> Path:
    """A copy of RUN whose checkpoints are gone: no epoch has finished."""
    copy = ws.tmp / "started"
    shutil.copytree(ws.run, copy)
    shutil.rmtree(copy / "checkpoints")
    return copy


# The student as a deliverable: ONNX / int8 exports, predict, bench-model (the optional extra 'deploy').
DEPLOY_CASES: list[Case] = [
    Case("onnx-no-epoch", "export", "an ONNX export of a run with no finished epoch",
         lambda ws: ["export", str(_no_epoch(ws)), "--format", "onnx"], needs="onnxruntime"),
    Case("onnx-untraceable", "export", "an ONNX export of a model with an operator the exporter cannot translate",
         lambda ws: ["export", str(_odd_run(ws)), "--format", "onnx", "--out", str(ws.tmp / "e")],
         needs="onnxruntime"),
    Case("onnx-exists", "export", "an ONNX export over a file that exists",
         lambda ws: ["export", str(ws.run), "--format", "onnx", "--out", str(_file(ws, "student.onnx").parent)],
         needs="onnxruntime"),
    Case("quantize-no-calibration", "export", "an int8 quantization with no calibration images",
         lambda ws: ["export", str(ws.run), "--format", "onnx", "--quantize", "int8", "--calibration-images", "0",
                     "--out", str(ws.tmp / "e")], needs="onnxruntime"),
    Case("quantize-safetensors", "export", "--quantize int8 of a .safetensors export",
         lambda ws: ["export", str(ws.run), "--quantize", "int8", "--out", str(ws.tmp / "e")]),
    Case("predict-corrupt-onnx", "predict", "predict with a corrupt .onnx file",
         lambda ws: ["predict", str(_file(ws, "student.onnx", b"\x08\x07 not a model")),
                     str(_file(ws, "x.png"))], needs="onnxruntime"),
    Case("bench-corrupt-onnx", "predict", "bench-model of a corrupt .onnx file",
         lambda ws: ["bench-model", str(_file(ws, "student.onnx", b"\x08\x07 not a model"))], needs="onnxruntime"),
    Case("predict-undecodable", "predict", "predict on an image that cannot be decoded",
         lambda ws: ["predict", str(ws.run), str(_file(ws, "photo.jpg", b"\xff\xd8\xff\xe0 no JPEG body"))]),
    Case("predict-no-image", "predict", "predict on a folder without images",
         lambda ws: ["predict", str(ws.run), str(ws.tmp)]),
    Case("predict-missing-model", "predict", "predict with a model file that does not exist",
         lambda ws: ["predict", str(ws.tmp / "student.onnx"), str(_file(ws, "x.png"))]),
]
CASES += DEPLOY_CASES

def _idx_run(ws: Workspace, edit: str) -> Path:
    """A finished run on IDX files, whose data then moves away (``move``) or changes by one pixel (``pixel``)."""
    folder = ws.idx_folder(n=120)
    out = ws.tmp / "idx-run"
    code, text = run_argv(ws.train("--dataset", "mnist", "--data-root", str(folder), out=out))
    assert code == 0, text
    images = folder / "t10k-images-idx3-ubyte.gz"
    if edit == "move":
        folder.rename(ws.tmp / "moved")
    else:
        data = bytearray(gzip.decompress(images.read_bytes()))
        data[-1] ^= 0xFF
        images.write_bytes(gzip.compress(bytes(data)))
    return out


def _cifar_changed(ws: Workspace) -> Path:
    """Extracted CIFAR-10 files (synthetic, their md5s known as the originals' are), one byte of one changed."""
    from _cifar_files import write_cifar

    root = write_cifar(ws.tmp / "cifar", "cifar10", per_class=2, test_per_class=1)
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    data = bytearray(batch.read_bytes())
    data[-100] ^= 0x01  # a pixel
    batch.write_bytes(bytes(data))
    return root


def _ban_run(ws: Workspace) -> list[str]:
    """A finished run of born-again generations (2), and the arguments that trained it."""
    argv = ws.train("--algo", "ban", "--generations", "2", "--allow-weak-teacher", out=ws.tmp / "ban")
    code, text = run_argv(argv)
    assert code == 0, text
    return argv


# Reliability, third round (second part): flags a list would ignore, derived artefacts reused, machines, ranks.
REUSE_CASES: list[Case] = [
    Case("model-not-a-listed-student", "config value", "--model that --students (a list of architectures) ignores",
         lambda ws: ws.train("--algo", "dml", "--students", "cnn,cnn_wide")),
    Case("calibrate-data-moved", "calibrate", "calibrate of a run whose data folder moved (the advice: --data-root)",
         lambda ws: ["calibrate", str(_idx_run(ws, edit="move"))]),
    Case("calibrate-data-changed", "calibrate", "calibrate of a run whose data changed since (one pixel)",
         lambda ws: ["calibrate", str(_idx_run(ws, edit="pixel"))]),
    Case("export-data-root-safetensors", "export", "--data-root for a .safetensors export, which reads no data",
         lambda ws: ["export", str(ws.run), "--data-root", str(ws.tmp), "--out", str(ws.tmp / "e")]),
    Case("cifar-md5", "data file", "an extracted CIFAR file with one changed byte (its md5 is known)",
         lambda ws: ws.train("--dataset", "cifar10", "--data-root", str(_cifar_changed(ws)))),
    Case("ban-resume-other-config", "checkpoint", "--resume of born-again generations with other settings",
         lambda ws: [*_ban_run(ws)[:-1], "--lr", "0.01", "--resume"]),
    Case("virtual-p-both", "config value", "--virtual-p and --virtual-p-from together (the derived p would replace it)",
         lambda ws: ws.train("--algo", "tfkd", "--virtual-p", "0.5", "--virtual-p-from", str(ws.run))),
    Case("virtual-p-from-missing", "config value", "--virtual-p-from a folder that is not a finished run",
         lambda ws: ws.train("--algo", "tfkd", "--virtual-p-from", str(ws.tmp / "nowhere"))),
    Case("students-unknown", "config value", "an unknown architecture among the listed students",
         lambda ws: ws.train("--algo", "dml", "--model", "cnn", "--students", "cnn,resnet1")),
    Case("teacher-mix-count", "config value", "more mixing weights than teachers",
         lambda ws: ws.train("--algo", "kd", "--teacher", "mlp,cnn", "--teacher-weights", "random", "--teacher-mix",
                             "0.2,0.3,0.5")),
    Case("teacher-weights-count", "config value", "more teacher-weights entries than teachers",
         lambda ws: ws.train("--algo", "kd", "--teacher", "mlp,cnn", "--teacher-weights", "random,random,random")),
    Case("teacher-list-empty", "config file", "an empty list of teachers in a config file",
         lambda ws: ws.train(_yaml(ws, "algo: kd\nteacher: []\n"))),
    Case("teacher-list-nested", "config file", "a list inside the list of teachers in a config file",
         lambda ws: ws.train(_yaml(ws, "algo: kd\nteacher: [mlp, [cnn]]\n"))),
    Case("teacher-weights-list-count", "config file", "more teacher_weights entries than teachers, as YAML lists",
         lambda ws: ws.train(_yaml(ws, "algo: kd\nteacher: [mlp, cnn]\nteacher_weights: [random, random, random]\n"))),
    Case("teacher-store-file", "config value", "a teacher store that is a file",
         lambda ws: ws.train("--algo", "kd", "--teacher", "mlp", "--teacher-weights", "random", "--teacher-store",
                             str(_file(ws, "store.txt")))),
    Case("set-bad-value", "flag", "--set with a value of the wrong type", lambda ws: ws.train("--set", "lr=abc")),
    Case("export-which", "flag", "export of an unknown checkpoint choice",
         lambda ws: ["export", str(ws.run), "--which", "first", "--out", str(ws.tmp / "e")]),
    Case("cifar-root-mistyped", "data file", "a mistyped CIFAR --data-root (never created by a download)",
         lambda ws: ws.train("--dataset", "cifar10", "--data-root", str(ws.tmp / "cifra"))),
    Case("calibrate-not-a-dir", "calibrate", "calibrate of a file", lambda ws: ["calibrate", str(_file(ws, "f.txt"))]),
    Case("calibrate-device", "calibrate", "calibrate on an unknown device",
         lambda ws: ["calibrate", str(ws.run), "--device", "tpu"]),
    Case("report-missing", "report", "a report of a folder that does not exist",
         lambda ws: ["report", str(ws.tmp / "nowhere"), "--out", str(ws.tmp / "r")]),
    Case("sweep-empty-axis", "config file", "a sweep axis with no values",
         lambda ws: ["sweep", _yaml(ws, "dataset: synthetic\ngrid:\n  seed: []\n"), "--out", str(ws.tmp / "s")]),
]
CASES += REUSE_CASES


def _tune(ws: Workspace, *args: str) -> list[str]:
    """``tune`` on the tiny synthetic data, its --out the finished run (which must stay byte-identical)."""
    return ["tune", *TINY, "--out", str(ws.run), *args]


# An equal tuning budget (the optional extra 'tune'): refused before a study is opened or a trial runs.
TUNE_CASES: list[Case] = [
    Case("tune-zero-trials", "tune", "a tuning budget of 0 trials",
         lambda ws: _tune(ws, "--algo", "kd", "--trials", "0")),
    Case("tune-unknown-algo", "tune", "an unknown method to tune",
         lambda ws: _tune(ws, "--algo", "kd,kdd", "--trials", "4")),
    Case("tune-nothing-to-tune", "tune", "a method left with nothing to tune (baseline, its lr and decay fixed)",
         lambda ws: _tune(ws, "--algo", "baseline", "--trials", "4", "--lr", "0.01", "--weight-decay", "0")),
    Case("tune-storage", "tune", "a --storage database that cannot be opened",
         lambda ws: _tune(ws, "--algo", "kd", "--trials", "4", "--storage", f"sqlite:///{ws.tmp}/no/such/t.db"),
         needs="optuna"),
    Case("tune-per-method-unread", "tune", "a per_method key that the method does not read",
         lambda ws: ["tune", _yaml(ws, "per_method: {dml: {hint_stage: embedding}}\n"), *_tune(ws)[1:],
                     "--algo", "dml", "--trials", "4"], needs="optuna"),
    Case("tune-key-a-method-refuses", "tune", "a fixed key one of the methods refuses (ban with 2 students)",
         lambda ws: _tune(ws, "--algo", "baseline,ban", "--trials", "4", "--students", "2"), needs="optuna"),
]
CASES += TUNE_CASES


def _torch_file(ws: Workspace, name: str, obj: object) -> Path:
    path = ws.tmp / name
    torch.save(obj, path)
    return path


def make_reference_run(folder: Path) -> Path:
    """The finished run every case must leave untouched."""
    from distillistic import cli

    out = folder / "pristine"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["train", *TINY, "--out", str(out)]) == 0
    return out


@contextlib.contextmanager
def _fashion_offline(enabled: bool) -> Iterator[None]:
    from distillistic.data import datasets

    saved = datasets.FASHION_MIRRORS
    if enabled:
        datasets.FASHION_MIRRORS = ("file:///nonexistent-mirror/",)
    try:
        yield
    finally:
        datasets.FASHION_MIRRORS = saved


def run_case(case: Case, ws: Workspace) -> tuple[int, str, list[str]]:
    """Prepare the case's files and run the CLI on its arguments: see :func:`run_argv`."""
    argv = case.argv(ws)
    code, text = run_argv(argv, case.fashion_offline, case.patch)
    return code, text, argv


def run_argv(argv: list[str], fashion_offline: bool = False,
             patch: Callable[[], contextlib.AbstractContextManager[object]] | None = None) -> tuple[int, str]:
    """``distillistic.cli.main(argv)``: its exit code and everything it would print to stderr.

    stderr here includes the log records (the CLI logs INFO and above to stderr) and warnings.
    """
    from distillistic import cli

    err = io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("distillistic")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
                warnings.catch_warnings(record=True) as caught, _fashion_offline(fashion_offline), \
                (patch() if patch is not None else contextlib.nullcontext()):
            warnings.simplefilter("always")
            try:
                code = cli.main(argv)
            except SystemExit as e:  # argparse errors exit through SystemExit(2)
                code = e.code if isinstance(e.code, int) else 1
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    text = err.getvalue() + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
    # the tiny data's own warnings (few steps, few validation samples) precede the error; the check is the error's
    return code, "".join(line for line in text.splitlines(keepends=True) if not line.rstrip().endswith(SMALL_DATA))


SMALL_DATA = "(docs/small-data.md)"


def normalise(text: str, ws: Workspace) -> str:
    # the number of registered models depends on which cases ran before in this process (some register a plugin)
    text = re.sub(r"one of \d+ models", "one of N models", text)
    return text.replace(str(ws.run), "RUN").replace(str(ws.tmp), "TMP")


def show_argv(argv: list[str], ws: Workspace) -> str:
    text = shlex.join(argv)
    text = text.replace(shlex.join(TINY), "…")
    return normalise(text, ws)


def documented_messages() -> dict[str, str]:
    """Case id -> message, as the table in docs/bad-inputs.md states them."""
    out = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.replace("\\|", "\x00").split("|")]
        if len(cells) == 7 and cells[1].startswith("`") and cells[5].startswith("`"):
            out[cells[1].strip("`")] = cells[5].strip("`").replace("\x00", "|")
    return out


def _cell(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def write_doc() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["DISTILLISTIC_CACHE"] = str(Path(scratch) / "cache")
        pristine = make_reference_run(Path(scratch))
        for i, case in enumerate(CASES):
            base = Path(scratch) / f"case{i}"
            ws = Workspace(base / "tmp", base / "run")
            ws.tmp.mkdir(parents=True)
            shutil.copytree(pristine, ws.run)
            code, text, argv = run_case(case, ws)
            lines = text.strip().splitlines()
            if code != 2 or len(lines) != 1:
                raise SystemExit(f"case {case.id}: exit code {code}, stderr:\n{text}")
            message = normalise(lines[0], ws)
            rows.append(f"| {_cell(case.id)} | {case.kind} | {case.what} | {_cell(show_argv(argv, ws))} "
                        f"| {_cell(message)} |")
    header = f"""# Bad inputs and what distillistic says

Every row is a bad input tried against the real CLI (`distillistic.cli.main`), with the exact line it
prints to stderr; each exits with code 2, prints that one line and nothing else (no traceback, no log
line), and leaves an existing run directory byte-identical. The table is generated by
`PYTHONPATH=src python tests/bad_inputs.py` from the cases in `tests/bad_inputs.py`, and
`tests/test_bad_inputs.py` checks every row against the CLI again, so the messages here are the
current ones.

In the commands, `…` stands for a tiny synthetic run (`{shlex.join(TINY)}`), `RUN` for a
finished run directory (the one that must stay intact: most rows even pass `--overwrite` for it, so
that a check made too late would show) and `TMP` for a scratch folder holding the case's files.

{len(CASES)} kinds of bad input:

| case | kind | bad input | command (`distillistic …`) | message (stderr; exit code 2) |
| --- | --- | --- | --- | --- |
"""
    footer = """
## What is checked before a run starts, and what only later

Everything above is refused before the run directory is touched. Some problems can only show later:

* **Damaged image pixels.** Image folders are checked up front for empty files, truncated JPEG/PNG
  files (missing end marker) and files whose header PIL cannot identify, while their content is
  hashed for the manifest (`--data-hash content`, the default; per-file hashes are cached by path,
  size and mtime, so only new or changed files are read again). Damage inside the compressed
  pixel data, and every check with `--data-hash listing` (names and sizes only, no file read),
  surfaces when the image is decoded during training: still one error line naming the file and
  exit code 2, after the run's own log lines; the checkpoints written so far stay and `--resume`
  continues once the file is replaced.
* **Divergence.** A NaN or inf loss (or weights) stops the run with exit code 2 and
  `distillistic: error: training diverged: the loss became NaN or inf (epoch E, step S); the last
  good checkpoint is …`; `summary.json` gets `"status": "diverged"` and the reason, and no
  checkpoint with non-finite weights is ever written.
* **Signals.** SIGINT (Ctrl-C) and SIGTERM to the main process finish the current step, write
  `checkpoints/last.pt` and exit 130 (Ctrl-C) or 143 (SIGTERM), 128 + the signal as shells report it, so a
  script can tell an interrupted run from a finished one (exit 0), printing the exact command that resumes;
  a second signal stops at once (exit 130) and the previous checkpoint stays. Data-loading workers ignore Ctrl-C.
  A SIGTERM sent to every process of the group (as batch schedulers do) also ends an image-folder run's
  workers: the step in progress still finishes and checkpoints; if the main process was waiting
  for a batch instead, the run stops at its last checkpoint (exit 143; resume as usual).
* **Signals outside training.** While a teacher is trained first (`--teacher-weights train`), SIGINT or
  SIGTERM stops the teacher's training as above (its `last.pt` is written into the cache): the
  distillation never starts on it and the run exits 130 / 143 with `distillistic: the teacher's training
  (trained first into 'DIR') stopped by a signal …; nothing was distilled from it; resume both with:
  <the same command>`; that command resumes the teacher from its `last.pt` (also after a SIGKILL),
  then distils. A teacher whose training fails or diverges is never used either (exit 2). During the
  final evaluation a signal stops at once: `summary.json` says `interrupted` (never `completed`), exit
  0 and the resume command, which only evaluates. While data, teachers and the store are being set
  up, SIGINT or SIGTERM ends the command with `distillistic: interrupted` and exit code 130 (nothing
  is trained yet; run the same command again). A teacher-store file is written to a temporary name
  and renamed once complete, so a kill at any point never leaves a half-written file in use.
* **Integrity.** Every checkpoint carries the sha256 of its content (tensors' bytes, dtypes and
  shapes, and every value), verified on every load; a damaged file is refused by name (exit 2). A
  damaged cached teacher is trained again with a warning, and a damaged teacher-store file is
  recomputed with a warning (its CRC-32). `--resume` compares the config, the teacher's weights and
  the data's checksum with the run's, and a run directory is locked (`DIR/.lock`) by the run using it.
* **Reuse.** A resume checks every `best-*.pt` against the sha256 of its weights that `last.pt` records: a
  missing, damaged or other run's best file is set aside as `best-<model>.pt.rejected` with one line and never
  used (the best-on-val record restarts with the next epoch, or, when none remains, the last epoch's weights from
  `last.pt` become the best). A resume on another device, thread count or compilation proceeds with one line
  (bit-exactness needs the same). A process that waits for a lock (a teacher being trained, the teacher store),
  or is refused one, names its holder (process, host, since when, command) and how to end it if it hangs.
* **Ranks.** Under torchrun every rank checks at start that it holds rank 0's resolved config and data
  checksum: a rank given other settings, or a bad input on one rank, stops every rank with one line (exit 2).
"""
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(header + "\n".join(rows) + "\n" + footer, encoding="utf-8")
    print(f"wrote {DOC} ({len(rows)} cases)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    write_doc()
