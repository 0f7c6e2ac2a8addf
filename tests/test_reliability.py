"""Reliability: nothing trains on a half-made input, checkpoints prove their integrity, resume
checks what it resumes, a run directory is locked by its run, inputs are bounded, OS failures are one line.

The signal tests run the real CLI in a subprocess with faults injected by ``DISTILLISTIC_FAULT``
(:func:`distillistic.fileio.fault_point`): SIGTERM and SIGKILL during a teacher trained first, during the
final evaluation and while the teacher store writes a file.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import resource
import signal
import subprocess
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import _forked_cli as forked_cli
from _util import write_idx_split
from bad_inputs import run_argv
from distillistic import config as config_mod
from distillistic.core.divergences import js, kl
from distillistic.errors import CheckpointError, UserError
from distillistic.fileio import atomic_write, content_hash, load, save

TINY = ["--dataset", "synthetic", "--synthetic-samples", "96", "--image-size", "8", "--model", "mlp", "--epochs", "2",
        "--batch-size", "16", "--device", "cpu", "--threads", "1", "--no-tensorboard", "--no-progress"]


def run_cli(args: list[str], fault: str | None = None, cache: Path | None = None,
            wait: bool = True) -> subprocess.CompletedProcess[str] | forked_cli.Child:
    """``python -m distillistic ARGS`` in a process (and session) of its own, forked from a server that has
    imported torch once (``tests/_forked_cli.py``); with ``wait=False``, the running child."""
    env = forked_cli.cli_env(fault, **({"DISTILLISTIC_CACHE": str(cache)} if cache else {}))
    child = forked_cli.Child(args, env)
    return child.wait(timeout=400) if wait else child


def _status(folder: Path) -> str | None:
    path = folder / "summary.json"
    return json.loads(path.read_text()).get("status") if path.is_file() else None


# --- checkpoints prove their integrity ----------------------------------------------------------------


def _flip_a_tensor_byte(path: Path) -> None:
    """Flip one byte inside the first tensor's data of a torch zip checkpoint (its CRC is not checked)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 16)
    raw = bytearray(path.read_bytes())
    name_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    at = info.header_offset + 30 + name_len + extra_len + 5
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


def test_content_hash_sees_one_bit_and_the_structure() -> None:
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": [1, (2, 3.5)], "s": "x"}
    b = {"w": a["w"].clone(), "n": [1, (2, 3.5)], "s": "x"}
    assert content_hash(a) == content_hash(b)
    b["w"].view(torch.int32)[0, 0] ^= 1  # one bit of one float
    assert content_hash(a) != content_hash(b)
    assert content_hash({"n": [1, 2]}) != content_hash({"n": (1, 2)})
    assert content_hash({"w": torch.zeros(2, 3)}) != content_hash({"w": torch.zeros(3, 2)})


def test_a_checkpoint_with_one_flipped_tensor_byte_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save({"kind": "x", "models": {"m": {"w": torch.randn(64)}}}, path)
    assert load(path)["kind"] == "x"
    _flip_a_tensor_byte(path)
    assert torch.load(path, weights_only=True)["kind"] == "x"  # torch itself does not notice
    with pytest.raises(CheckpointError, match=f"checkpoint '{path}' fails its integrity check"):
        load(path)


def test_resume_on_a_last_pt_with_a_flipped_byte_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, _ = run_argv(["train", *TINY, "--out", str(out)])
    assert code == 0
    last = out / "checkpoints" / "last.pt"
    _flip_a_tensor_byte(last)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, text = run_argv(["train", *TINY, "--out", str(out), "--resume"])
    assert code == 2
    assert text == (f"distillistic: error: checkpoint '{last}' fails its integrity check (the sha256 of its content "
                    "differs from the recorded one): the file is damaged; use another checkpoint or start a new "
                    "--out\n")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


# --- resume checks what it resumes; one run per directory ---------------------------------------------


@pytest.mark.multiprocess
def test_data_changed_between_a_kill_and_a_resume_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_idx_split(data, "t10k", (np.arange(120) % 10).astype(np.uint8))
    out = tmp_path / "run"
    args = ["train", *TINY, "--dataset", "mnist", "--data-root", str(data), "--checkpoint-every", "2", "--out",
            str(out)]
    killed = run_cli(args, fault="step:3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (out / "checkpoints" / "last.pt").is_file()
    manifest = (out / "manifest.json").read_bytes()
    write_idx_split(data, "t10k", (np.arange(120) % 10).astype(np.uint8), seed=1)  # other pixels, same shapes
    code, text = run_argv([*args, "--resume"])
    assert code == 2
    assert text == ("distillistic: error: --resume: the data differs from the run being resumed (the dataset's "
                    f"checksum changed since it started: {out / 'manifest.json'} has the old one); resume with the "
                    "same data, or start a new --out\n")
    assert text.count("\n") == 1
    assert (out / "manifest.json").read_bytes() == manifest  # the old manifest is kept


def test_resume_of_a_folder_that_does_not_exist_says_so(tmp_path: Path) -> None:
    code, text = run_argv(["train", *TINY, "--out", str(tmp_path / "nope"), "--resume"])
    assert (code, text) == (2, f"distillistic: error: --resume: '{tmp_path / 'nope'}' does not exist; check the "
                               "path, or drop --resume to start a new run there\n")
    assert not (tmp_path / "nope").exists()


def _state(pid: int) -> str:
    """The process state letter of ``/proc/<pid>/stat`` (``T``: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.multiprocess
def test_two_trains_on_one_out_at_once_one_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run_cli(["train", *TINY, "--out", str(out)], fault="step:1:STOP", wait=False)
    assert isinstance(first, forked_cli.Child)
    try:
        deadline = time.monotonic() + 300
        while _state(first.pid) != "T":  # it stops itself (SIGSTOP) after its first step
            assert first.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.2)
        for flags in ([], ["--overwrite"], ["--resume"]):
            code, text = run_argv(["train", *TINY, "--out", str(out), *flags])
            # the refusal says who holds the lock (the first train's process) and how to break it if it hangs
            assert code == 2
            assert text.startswith(f"distillistic: error: '{out}' is in use by another run: process {first.pid} on "
                                   f"{platform.node()} since "), text
            assert text.endswith(f" holds {out / '.lock'}; wait for that run to end or choose another --out; if that "
                                 f"process hangs, kill {first.pid}: the system then releases its lock (there is no "
                                 "file to delete)\n"), text
            assert text.count("\n") == 1
    finally:
        os.kill(first.pid, signal.SIGCONT)
        ended = first.wait(timeout=400)
    assert ended.returncode == 0, ended.stderr[-2000:]
    assert _status(out) == "completed"
    code, _ = run_argv(["train", *TINY, "--out", str(out), "--overwrite"])  # free again once it ended
    assert code == 0


# --- inputs are bounded --------------------------------------------------------------------------------

BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]\n"
                                              for p, c in zip("abcdefg", "bcdefgh"))  # 9**8 values


def test_a_nested_alias_bomb_is_refused_fast_and_small(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(path.read_bytes()) <= 300
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(UserError, match="more than 100000 values once its aliases are expanded"):
        config_mod.read_yaml(path)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 1.0
    assert peak < 4 << 20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 50 << 10  # KiB: no hidden blow-up


def test_yaml_anchors_in_moderation_still_work(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("epochs: &e 3\nteacher_epochs: *e\n")
    assert config_mod.read_yaml(path) == {"epochs": 3, "teacher_epochs": 3}


def test_too_deep_and_too_large_config_files_are_refused(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 30 + "]" * 30 + "\n")
    with pytest.raises(UserError, match="nested deeper than 20 levels"):
        config_mod.read_yaml(deep)
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000)
    with pytest.raises(UserError, match="is larger than 1 MiB"):
        config_mod.read_yaml(big)


@pytest.mark.parametrize("temperature", [0.01, 1.0, 20.0, 20.5, 100.0, 1000.0])
def test_kl_and_js_are_non_negative_and_match_float64_over_the_allowed_range(temperature: float) -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(64, 100, generator=gen) * 10
    for q_logits in (z + 1e-3 * torch.randn(64, 100, generator=gen), z.clone()):  # nearly equal, equal
        q = torch.softmax(q_logits.double() / temperature, -1).float().double()  # what kl receives
        ref = (q * (q.clamp_min(1e-300).log() - torch.log_softmax(z.double() / temperature, -1))).sum(-1).mean()
        ref = max(0.0, temperature**2 * float(ref))  # float32 q need not sum to 1 exactly: a residue < 0
        got = kl(q.float(), z, temperature)
        assert got.dtype == torch.float32
        assert float(got) >= 0.0
        assert float(js(q.float(), z, temperature)) >= 0.0
        if temperature > 20:  # float64 arithmetic above T = 20: close to the float64 reference
            assert abs(float(got) - ref) <= temperature**2 * 1e-9 + 1e-3 * ref


def test_kl_in_the_common_range_is_the_float32_formula_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(1)
    z, t = torch.randn(8, 10, generator=gen), torch.randn(8, 10, generator=gen)
    q = torch.softmax(t / 4.0, -1)
    expected = 16.0 * (torch.xlogy(q, q) - q * torch.log_softmax(z / 4.0, -1)).sum(-1).mean()
    assert torch.equal(kl(q, z, 4.0), expected)


# --- OS failures are one line --------------------------------------------------------------------------


def test_disk_full_while_writing_a_checkpoint_is_one_line_and_keeps_the_old_file(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch
                                                                                 ) -> None:
    out = tmp_path / "run"
    assert run_argv(["train", *TINY, "--out", str(out)])[0] == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    code, text = run_argv(["train", *TINY, "--out", str(out), "--resume", "--epochs", "2"])
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert code == 2
    assert text.endswith(": No space left on device; free some space or choose another folder\n"), text
    assert text.splitlines()[-1].startswith("distillistic: error: cannot write '")
    assert not list(out.rglob(".*.tmp"))
    for path in (out / "checkpoints").iterdir():
        assert path.read_bytes() == before[path]
    assert _status(out) == "completed"  # what was there stays as it was


def test_os_errors_anywhere_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cannot write '.*': File name too long; use a shorter name"):
        atomic_write(tmp_path / ("n" * 300), b"x")
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "missing" / "target")
    code, text = run_argv(["train", *TINY, "--out", str(dangling / "run")])
    assert code == 2
    assert text.count("\n") == 1
    assert text.startswith("distillistic: error: "), text


# --- signals at any point: nothing used half-made -------------------------------------------------------

KD = ["--algo", "kd", "--teacher", "mlp", "--teacher-weights", "train", "--teacher-epochs", "2"]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("sig", ["TERM", "KILL"])
def test_a_signal_during_a_teacher_trained_first(sig: str, tmp_path: Path) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["train", *TINY, *KD, "--out", str(out)]
    # the teacher trains first (2 epochs of 4 steps): TERM in its first epoch, KILL in its second (after last.pt)
    stopped = run_cli(args, fault="step:3:TERM" if sig == "TERM" else "step:6:KILL", cache=cache)
    assert not (out / "summary.json").exists()  # nothing distilled, nothing claimed
    (teacher,) = (cache / "teachers").glob("mlp-*[!k]")
    assert (teacher / "checkpoints" / "last.pt").is_file()
    assert _status(teacher) != "completed"
    if sig == "TERM":
        assert stopped.returncode == 143, stopped.stderr[-2000:]
        last = stopped.stderr.strip().splitlines()[-1]
        assert last.startswith(f"distillistic: the teacher's training (trained first into '{teacher}') stopped by "
                               "a signal at epoch 1, step 3; checkpoint written; nothing was distilled from it; "
                               "resume both with: "), last
        assert last.endswith(" ".join(args[1:]).replace(str(out), str(out))), last
        assert _status(teacher) == "interrupted"
    else:
        assert stopped.returncode == -signal.SIGKILL
    resumed = run_cli(args, cache=cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"teacher: resuming mlp (2 epochs) in {teacher}" in resumed.stderr
    where = "epoch 1, step 3" if sig == "TERM" else "epoch 2"
    assert f"resuming {teacher} at {where}" in resumed.stderr  # not started over
    assert _status(teacher) == "completed"
    assert _status(out) == "completed"


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("sig", ["TERM", "KILL"])
def test_a_signal_during_the_final_evaluation(sig: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", *TINY, "--out", str(out)]
    stopped = run_cli(args, fault=f"final:1:{sig}")
    if sig == "TERM":
        assert stopped.returncode == 143, stopped.stderr[-2000:]
        assert stopped.stderr.strip().splitlines()[-1].startswith(
            "distillistic: stopped by a signal during the final evaluation; every epoch is trained and "
            "checkpointed; resume with: ")
        assert _status(out) == "interrupted"
    else:
        assert stopped.returncode == -signal.SIGKILL
        assert _status(out) is None  # never claimed complete
    resumed = run_cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "all 2 epochs are trained; evaluating" in resumed.stderr
    assert _status(out) == "completed"


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("sig", ["TERM", "KILL"])
def test_a_signal_while_the_teacher_store_writes(sig: str, tmp_path: Path) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    teacher = tmp_path / "teacher.pt"
    from distillistic.models.builders import build_model

    torch.save(build_model("mlp", 10, 1, 8).state_dict(), teacher)
    args = ["train", *TINY, "--algo", "kd", "--teacher", "mlp", "--teacher-weights", str(teacher), "--out", str(out),
            "--allow-weak-teacher"]
    stopped = run_cli(args, fault=f"mid-write-epoch-0000.safetensors:1:{sig}", cache=cache)
    (entry,) = (cache / "teacher-store").iterdir()
    files = list(entry.rglob("epoch-*.safetensors"))
    if sig == "TERM":  # the write completes, the step finishes, the run checkpoints and stops
        assert stopped.returncode == 143, stopped.stderr[-2000:]
        assert "resume with: " in stopped.stderr.strip().splitlines()[-1]
        assert [f.name for f in files] == ["epoch-0000.safetensors"]
    else:
        assert stopped.returncode == -signal.SIGKILL
        assert files == []  # only a temporary, never a half-written store file
    assert _status(out) != "completed"
    again = "--resume" if (out / "checkpoints" / "last.pt").is_file() else "--overwrite"  # killed before one
    resumed = run_cli([*args, again], cache=cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "is damaged" not in resumed.stderr
    assert _status(out) == "completed"
    assert not list(entry.rglob(".*.tmp"))


@pytest.mark.slow
def test_a_damaged_cached_teacher_is_trained_again_with_a_warning(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLISTIC_CACHE", str(tmp_path / "cache"))
    args = ["train", *TINY, *KD, "--teacher-epochs", "1", "--allow-weak-teacher"]
    code, text = run_argv([*args, "--out", str(tmp_path / "a")])
    assert code == 0, text
    (teacher,) = (tmp_path / "cache" / "teachers").glob("mlp-*[!k]")
    best = teacher / "checkpoints" / "best-student.pt"
    _flip_a_tensor_byte(best)
    code, text = run_argv([*args, "--out", str(tmp_path / "b")])
    assert code == 0, text
    assert f"teacher: the cached teacher is damaged (checkpoint '{best}' fails its integrity check" in text
    load(best)  # rewritten whole
    first = json.loads((tmp_path / "a" / "summary.json").read_text())["models"]["teacher"]["test"]
    second = json.loads((tmp_path / "b" / "summary.json").read_text())["models"]["teacher"]["test"]
    assert second["top1"] == first["top1"]  # the same recipe trains the same teacher again
