"""EMA copies (--ema), PCL's temporal mean teachers (pcl) and born-again generations (ban).

Known answers: the EMA update through a real one-step run against ``d·θ'_0 + (1 − d)·θ_1`` computed here in
float64; PCL's target and loss against the paper's formula written here in float64; the ensemble of
generations against Jensen's inequality (the NLL and Brier score of averaged probabilities are at most the
generations' mean); exact resume of an interrupted pcl run (EMA copies included) bit for bit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from _torchrun import FOLDER, job, outcome
from _util import run_cli, tiny
from distillistic import train
from distillistic.core.ema import EmaCopies
from distillistic.core.signals import StepInputs
from distillistic.methods import pcl as ema_mod
from distillistic.methods.pcl import TemporalMeanPeers
from distillistic.training.checkpoint import load, read_safetensors
from test_resume import _assert_same_tensors, _rows, _summary, assert_identical_runs
from test_resume import run_cli as run_process


class _Views:
    """One fixed batch ``[B, C, S, S]`` whatever the size asked (the models below are linear on it)."""

    def __init__(self, x: Tensor) -> None:
        self.x = x

    def get(self, size: int | None, channels: int) -> Tensor:
        return self.x


def test_ema_after_one_step_is_d_ema_plus_1_minus_d_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real run: one step (64 samples, batch 64), then θ'_1 = d·θ_0 + (1 − d)·θ_1 for every parameter."""
    initial: list[dict[str, Tensor]] = []
    bind = EmaCopies.bind

    def spy(self: EmaCopies, students: Any, views: Any) -> None:
        bind(self, students, views)
        initial.extend({k: v.detach().double().clone() for k, v in c.state_dict().items()} for c in self.copies)

    monkeypatch.setattr(EmaCopies, "bind", spy)
    d = 0.75
    out = tmp_path / "run"
    train(tiny(out, ema=d, max_train_samples=64, batch_size=64))
    ckpt = load(out / "checkpoints" / "last.pt")
    assert ckpt["progress"]["global_step"] == 1
    student, ema = ckpt["models"]["student"], ckpt["models"]["student_ema"]
    params = [k for k, v in student.items() if v.is_floating_point() and "running" not in k]
    assert params
    assert len(initial) == 1
    moved = 0
    for k in params:
        theta0, theta1 = initial[0][k], student[k].double()
        want = d * theta0 + (1 - d) * theta1
        torch.testing.assert_close(ema[k].double(), want, rtol=0, atol=1e-6)
        moved += int(not torch.equal(theta0, theta1))
    assert moved > 0  # the step changed the student, so the check above is not vacuous
    for k in student.keys() - set(params):  # buffers (BatchNorm statistics) are copied from the student
        assert torch.equal(ema[k], student[k]), k


def _kl64(q: Tensor, z: Tensor, t: float) -> Tensor:
    """``T² · (1/B) Σ_b Σ_c q (log q − log softmax(z/T))`` in float64."""
    logp = torch.log_softmax(z.double() / t, dim=-1)
    return t * t * (q * (q.log() - logp)).sum(dim=-1).mean()


def test_pcl_target_and_loss_match_the_paper_in_float64() -> None:
    g = torch.Generator().manual_seed(0)
    m, b, k, t = 3, 5, 4, 3.0
    students = [nn.Linear(6, k) for _ in range(m)]
    means = EmaCopies(0.999, warmup=True)
    means.bind(students, [(None, 1)] * m)
    term = TemporalMeanPeers(means, temperature=t, rampup=0.25)
    assert term.means is means
    assert not list(term.children())  # read, not owned: the objective owns the copies
    x = torch.randn(b, 6, generator=g)
    inp = StepInputs(_Views(x), torch.randint(0, k, (b,), generator=g), [], k)
    # The copies start as the students; move the students so the EMA copies differ from them.
    with torch.no_grad():
        for s in students:
            s.weight.add_(torch.randn(s.weight.shape, generator=g))
    ema_logits = [x.double() @ c.weight.double().T + c.bias.double() for c in term.means.copies]
    probs = [torch.softmax(z / t, dim=-1) for z in ema_logits]
    targets = term.targets(inp)
    z = torch.randn(b, k, generator=g)
    for i in range(m):
        want = sum(probs[j] for j in range(m) if j != i) / (m - 1)
        assert targets[i].shape == (1, b, k)
        torch.testing.assert_close(targets[i][0].double(), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(term.loss(i, z, inp, targets[i]).double(), _kl64(want, z, t), rtol=0, atol=1e-5)
    # mean teacher's ramp-up exp(-5 (1 - p/p_r)^2), 1 after p_r
    assert term.ramp(0.125) == pytest.approx(math.exp(-5 * 0.5**2))
    assert term.ramp(0.0) == pytest.approx(math.exp(-5))
    assert term.ramp(0.5) == 1.0


def test_pcl_ema_decay_warms_up_like_mean_teacher() -> None:
    """Update n uses min(1 − 1/(n + 1), d): the first copies the student, the second averages 1:1."""
    student = nn.Linear(3, 2)
    copies = EmaCopies(0.999, warmup=True)
    copies.bind([student], [(None, 1)])
    dummy = StepInputs(_Views(torch.zeros(1, 3)), torch.zeros(1, dtype=torch.long), [], 2)
    with torch.no_grad():
        student.weight.fill_(2.0)
    copies.after_step(dummy)
    assert torch.equal(copies.copies[0].weight, student.weight)
    with torch.no_grad():
        student.weight.fill_(4.0)
    copies.after_step(dummy)
    torch.testing.assert_close(copies.copies[0].weight, torch.full((2, 3), 3.0))
    state = copies.state_dict()
    again = EmaCopies(0.999, warmup=True)
    again.bind([nn.Linear(3, 2)], [(None, 1)])
    again.load_state_dict(state)
    assert again.updates == 2  # the schedule's position is checkpointed


@pytest.mark.e2e
def test_ema_flag_reports_selects_and_exports_the_copies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--model", "cnn", "--epochs", "2", "--batch-size", "64", "--lr", "3e-3",
            "--num-workers", "0", "--no-tensorboard", "--no-progress", "--ema", "0.9", "--out", str(out)]
    rc, _, err = run_cli(args, capsys)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    models = summary["models"]
    assert set(models) == {"student", "student_ema"}
    for part in ("test", "test_last", "val_best", "val_last"):
        assert models["student_ema"][part]["n"] > 0, part
    assert models["student_ema"]["test"] != models["student"]["test"]  # another model, evaluated on its own
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ema_val = [r for r in rows if r["model"] == "student_ema" and r["split"] == "val"]
    assert [r["epoch"] for r in ema_val] == [1, 2]
    best = max(ema_val, key=lambda r: r["top1"])  # selected on val (the first best on a tie)
    assert models["student_ema"]["val_best"]["epoch"] == best["epoch"]
    assert models["student_ema"]["val_best"]["top1"] == pytest.approx(best["top1"])
    rc, _, err = run_cli(["export", str(out)], capsys)
    assert rc == 0, err
    state, meta = read_safetensors(out / "export" / "student_ema.safetensors")
    saved = load(out / "checkpoints" / "best-student_ema.pt")["models"]["student_ema"]
    assert meta["arch"] == "cnn"
    assert meta["name"] == "student_ema"
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in state)
    assert (out / "export" / "student.safetensors").is_file()


@pytest.mark.e2e
def test_pcl_trains_two_students_on_digits(tmp_path: Path) -> None:
    result = train(tiny(tmp_path / "run", algo="pcl", students=2, epochs=2))
    summary = result.summary
    assert summary["status"] == "completed"
    assert set(summary["models"]) == {"student0", "student1", "student0_ema", "student1_ema", "ensemble"}
    for name in ("student0", "student1", "student0_ema", "student1_ema"):
        assert summary["models"][name]["test"]["top1"] > 0.5, name  # 10 classes: chance is 0.1
    assert "r(p)·3²·KL(mean_(j≠i) softmax(z'_j/3) ‖ softmax(z/3))" in summary["objective"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train" and r["model"] == "student0"]
    assert all(r["pcl"] is not None and r["pcl"] > 0 for r in train_rows)


@pytest.mark.e2e
def test_ema_copies_of_a_mixed_cohort_take_their_students_architecture(tmp_path: Path) -> None:
    """Each EMA copy reads its own student's view and is recorded and exported with that student's arch."""
    from distillistic.runs.export import export_run

    out = tmp_path / "run"
    summary = train(tiny(out, algo="dml", students=("cnn", "mlp"), ema=0.5)).summary
    assert [summary["models"][n]["arch"] for n in ("student0_ema", "student1_ema")] == ["cnn", "mlp"]
    export_run(out)
    assert read_safetensors(out / "export" / "student1_ema.safetensors")[1]["arch"] == "mlp"
    assert summary["models"]["student1_ema"]["test"]["top1"] > 0.3  # a working mlp copy, not a cnn's weights


def test_pcl_refuses_a_single_student_and_ema_flag(tmp_path: Path) -> None:
    from distillistic.errors import UserError

    with pytest.raises(UserError, match="at least 2"):
        train(tiny(tmp_path / "a", algo="pcl", students=1))
    with pytest.raises(UserError, match="drop --ema"):
        train(tiny(tmp_path / "b", algo="pcl", ema=0.9))
    assert not (tmp_path / "b" / "summary.json").exists()


@pytest.mark.e2e
def test_ban_reports_three_generations_and_their_ensemble(tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = train(tiny(out, algo="ban", generations=3)).summary
    assert summary["status"] == "completed"
    assert [g["generation"] for g in summary["generations"]] == [1, 2, 3]
    assert [g["algo"] for g in summary["generations"]] == ["baseline", "kd", "kd"]
    models = summary["models"]
    assert {"gen1", "gen2", "gen3", "ensemble", "student"} <= set(models)
    for g in (1, 2, 3):
        own = json.loads((out / f"gen{g}" / "summary.json").read_text())
        assert own["status"] == "completed"
        assert models[f"gen{g}"]["test"] == own["models"]["student"]["test"]
    gen2 = json.loads(json.dumps(__import__("yaml").safe_load((out / "gen2" / "config.yaml").read_text())))
    assert gen2["teacher_weights"] == str(out / "gen1")
    assert gen2["teacher"] == "cnn"
    ens = models["ensemble"]["test"]
    gens = [models[f"gen{g}"]["test"] for g in (1, 2, 3)]
    # Jensen: -log of averaged probabilities <= average of -log; the Brier score is convex too.
    assert ens["nll"] <= sum(m["nll"] for m in gens) / 3 + 1e-9
    assert ens["brier"] <= sum(m["brier"] for m in gens) / 3 + 1e-9
    assert ens["n"] == gens[0]["n"]
    assert models["student"] == models["gen3"]
    assert json.loads((out / "summary.json").read_text()) == summary
    from distillistic.runs.export import export_run

    written = export_run(out)
    assert written == [out / "export" / f"gen{g}" / "student.safetensors" for g in (1, 2, 3)]
    state, _ = read_safetensors(written[2])
    saved = load(out / "gen3" / "checkpoints" / "best-student.pt")["models"]["student"]
    assert all(torch.equal(state[k], saved[k]) for k in saved)


def test_ban_refuses_a_cohort_before_writing(tmp_path: Path) -> None:
    from distillistic.errors import UserError

    with pytest.raises(UserError, match="'students' = 2 is not allowed: 1 for ban"):
        train(tiny(tmp_path / "run", algo="ban", students=2))
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_ban_with_one_generation_is_the_baseline(tmp_path: Path) -> None:
    ban = train(tiny(tmp_path / "ban", algo="ban", generations=1)).summary
    base = train(tiny(tmp_path / "base")).summary
    assert ban["models"]["gen1"]["test"] == base["models"]["student"]["test"]


def test_the_registry_lists_the_new_methods() -> None:
    from distillistic.config import Config
    from distillistic.methods.registry import METHODS
    from distillistic.training import setup

    pcl, ban = (setup.resolve(Config(algo=a, dataset="synthetic")) for a in ("pcl", "ban"))
    assert (pcl.students, pcl.temperature, ban.students, ban.temperature) == (2, 3.0, 1, 1.0)

    assert METHODS.get("pcl").reference == ema_mod.SPEC.reference
    assert {"pcl", "ban"} <= set(METHODS.names())


PCL_ARGS = ["train", "--algo", "pcl", "--students", "2", "--dataset", "synthetic", "--synthetic-samples", "160",
            "--image-size", "12", "--model", "cnn", "--epochs", "2", "--batch-size", "16", "--checkpoint-every", "3",
            "--device", "cpu", "--threads", "1", "--no-tensorboard", "--no-progress"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_an_interrupted_pcl_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """SIGKILL mid-epoch and before the final evaluation; the EMA copies and their schedule resume exactly."""
    import signal

    reference = tmp_path / "reference"
    assert run_process([*PCL_ARGS, "--out", str(reference)]).returncode == 0
    out = tmp_path / "run"
    own = [*PCL_ARGS, "--out", str(out)]
    assert run_process(own, fault="step:5").returncode == -signal.SIGKILL
    assert load(out / "checkpoints" / "last.pt")["progress"]["global_step"] == 3
    assert run_process([*own, "--resume"], fault="final").returncode == -signal.SIGKILL
    done = run_process([*own, "--resume"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert_identical_runs(reference, out)
    a, b = load(reference / "checkpoints" / "last.pt"), load(out / "checkpoints" / "last.pt")
    assert a["terms"].keys() == b["terms"].keys()
    assert any("copies" in k for k in a["terms"])
    for k in a["terms"]:
        if isinstance(a["terms"][k], Tensor):
            assert torch.equal(a["terms"][k], b["terms"][k]), k
        else:
            assert a["terms"][k] == b["terms"][k], k


BAN_ARGS = ["train", "--algo", "ban", "--generations", "2", "--dataset", "synthetic", "--synthetic-samples", "160",
            "--image-size", "12", "--model", "mlp", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
            "--threads", "1", "--no-tensorboard", "--no-progress", "--allow-weak-teacher"]  # mechanics, not accuracy


@pytest.mark.multiprocess
@pytest.mark.slow
def test_an_interrupted_ban_run_resumes_the_generation_it_stopped_in(tmp_path: Path) -> None:
    """SIGKILL before generation 1's final evaluation, then before generation 2's: --resume finishes both,
    and every generation ends as in an uninterrupted run (weights bit for bit)."""
    import signal

    reference = tmp_path / "reference"
    assert run_process([*BAN_ARGS, "--out", str(reference)]).returncode == 0
    out = tmp_path / "run"
    own = [*BAN_ARGS, "--out", str(out)]
    assert run_process(own, fault="final").returncode == -signal.SIGKILL
    assert not (out / "gen2").exists()
    assert run_process([*own, "--resume"], fault="final:2").returncode == -signal.SIGKILL  # gen 1 done, gen 2 killed
    assert json.loads((out / "gen1" / "summary.json").read_text())["status"] == "completed"
    done = run_process([*own, "--resume"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert_identical_runs(reference / "gen1", out / "gen1")
    ref2, got2 = reference / "gen2", out / "gen2"
    # train_flops counts the teacher's forwards that ran: the resumed generation reads from the store the killed
    # one filled, so it ran fewer (what it cost, not a difference in what it computed)
    def computed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "train_flops"} for r in rows]

    assert computed(_rows(got2)) == computed(_rows(ref2))
    want2, got2_summary = _summary(ref2), _summary(got2)
    for summary, folder in ((want2, reference), (got2_summary, out)):  # the teacher is another path, same weights
        assert summary["models"]["teacher"].pop("source") == str(folder / "gen1")
        summary.pop("train_flops", None)  # the teacher's forwards that ran (above)
    assert got2_summary == want2
    for name in ("last.pt", "best-student.pt"):
        a, b = load(ref2 / "checkpoints" / name), load(got2 / "checkpoints" / name)
        _assert_same_tensors(a["models"], b["models"], name)
    want, got = (json.loads((p / "summary.json").read_text()) for p in (reference, out))
    assert got["models"]["ensemble"] == want["models"]["ensemble"]
    assert [g["status"] for g in got["generations"]] == ["completed", "completed"]


def test_a_stopped_ban_run_says_so_and_prints_the_resume_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM in generation 2: it checkpoints, the run's summary says interrupted, and the hint resumes it."""
    from distillistic import fileio

    out = tmp_path / "run"
    args = [*BAN_ARGS, "--out", str(out)]
    fileio._FAULT_HITS.clear()
    monkeypatch.setenv("DISTILLISTIC_FAULT", "step:8:TERM")  # 7 steps a generation: step 1 of generation 2
    rc, _, err = run_cli(args, capsys)
    monkeypatch.delenv("DISTILLISTIC_FAULT")
    assert rc == 143  # stopped by SIGTERM, after its checkpoint
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["reason"].startswith("generation 2: stopped by a signal")
    assert [g["status"] for g in summary["generations"]] == ["completed", "interrupted"]
    assert any("resume with: " in line and line.endswith("--resume") for line in err), err
    rc, _, err = run_cli([*args, "--resume"], capsys)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert {"gen1", "gen2", "ensemble", "student"} <= set(summary["models"])


EMA_JOBS = {name: job(f"ema-{name}", "test_ema_methods.py::test_torchrun_two_processes", "train", *extra,
                       "--dataset", "synthetic", "--synthetic-samples", "300", "--model", "mlp", "--epochs", "1",
                       "--batch-size", "32", "--out", f"{FOLDER}/run", "--no-progress", "--no-tensorboard")
            for name, extra in {"pcl": ["--algo", "pcl"],
                                "ban-ema": ["--algo", "ban", "--generations", "2", "--ema", "0.9",
                                            "--allow-weak-teacher"]}.items()}


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("name", ["pcl", "ban-ema"])
def test_torchrun_two_processes(name: str, request: pytest.FixtureRequest) -> None:
    """Under torchrun (Gloo, CPU) the EMA copies and the generations' ensemble are evaluated over the whole
    held-out splits (every sample once across the ranks), and rank 0 alone writes. The runs share one torchrun
    launch with the other tests' runs (:mod:`_torchrun`)."""
    got = outcome(request, EMA_JOBS[name].name)
    assert got.codes == {0: 0, 1: 0}, got.tail()
    out = got.folder / "run"
    summary = json.loads((out / "summary.json").read_text())
    first = out / "gen1" if (out / "gen1").is_dir() else out
    sizes = json.loads((first / "manifest.json").read_text())["dataset"]["sizes"]
    assert json.loads((first / "manifest.json").read_text())["world_size"] == 2
    names = ["student0_ema", "student1_ema"] if name == "pcl" else ["gen1", "gen2", "ensemble"]
    for model in names:
        assert summary["models"][model]["test"]["n"] == sizes["test"], model
        assert summary["models"][model]["val_best"]["n"] == sizes["val"], model
    if name == "ban-ema":
        gen2 = json.loads((out / "gen2" / "summary.json").read_text())["models"]
        assert gen2["student_ema"]["test"]["n"] == sizes["test"]
    assert got.stdout.count(str(out)) == 1
