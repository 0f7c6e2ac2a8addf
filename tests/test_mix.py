"""Consistent teaching: ``--mix mixup|cutmix`` mixes each training batch once; the teacher and every student
read the same mixed image and the cross-entropy reads the mixed labels (Beyer et al. 2022).

Known answers: the mixing is torchvision's ``transforms.v2.MixUp`` / ``CutMix`` called on the same batch under
the same generator seed (images and labels equal), and a training step's inputs are compared with the mixed
batch made here by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from _util import tiny
from distillistic.config import Config, validate
from distillistic.data.mix import MIX_LIVE, BatchMix
from distillistic.errors import ConfigError


def _batch(n: int = 6, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 12, 12, generator=g, dtype=torch.float64), torch.randint(0, k, (n,), generator=g)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_the_mix_is_torchvisions_under_the_batch_key(kind: str) -> None:
    x, y = _batch()
    mix = BatchMix(kind, 0.4, 5, seed=3)
    index = torch.tensor([17, 2, 9, 11, 0, 5])
    params = mix.params(4, index, 12, 12)
    torch.manual_seed(mix.key(4, index))
    reference = (v2.MixUp if kind == "mixup" else v2.CutMix)(alpha=0.4, num_classes=5)
    want_x, want_y = reference(x, y)
    assert torch.equal(mix.images(x, params), want_x)
    torch.testing.assert_close(mix.labels(y, params, torch.float32), want_y, rtol=0, atol=1e-7)
    lam = float(want_y[0, y[0]]) if y[0] != y[-1] else None
    assert lam is None or 0.0 <= lam <= 1.0
    assert not torch.equal(want_x, x)  # something was mixed: the comparison has teeth


def test_the_draw_is_a_function_of_the_batch_only() -> None:
    mix = BatchMix("cutmix", 1.0, 10, seed=0)
    index = torch.arange(8)
    torch.manual_seed(123)
    first = mix.params(2, index, 16, 16)
    after = torch.rand(1)
    torch.manual_seed(123)
    again = mix.params(2, index, 16, 16)
    assert torch.equal(torch.rand(1), after)  # the global generator is left as it was
    assert first["box"] == again["box"]
    assert first["lam_adjusted"] == again["lam_adjusted"]
    draws = {mix.params(e, index + s, 16, 16)["lam_adjusted"] for e in range(3) for s in range(3)}
    assert len(draws) > 3  # another epoch or another batch: another draw
    other_seed = BatchMix("cutmix", 1.0, 10, seed=1).params(2, index, 16, 16)
    assert (other_seed["box"], other_seed["lam_adjusted"]) != (first["box"], first["lam_adjusted"])


def test_mixed_labels_sum_to_one_and_mix_the_rolled_labels() -> None:
    _, y = _batch(n=5, k=4)
    mix = BatchMix("mixup", 1.0, 4, seed=0)
    params = mix.params(0, torch.arange(5), 12, 12)
    soft = mix.labels(y, params, torch.float64)
    lam = params["lam"]
    expected = lam * F.one_hot(y, 4).double() + (1 - lam) * F.one_hot(y.roll(1, 0), 4).double()
    torch.testing.assert_close(soft, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(soft.sum(1), torch.ones(5, dtype=torch.float64))


def test_bad_mix_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="mix"):
        validate(Config(mix="blend"))
    with pytest.raises(ConfigError, match="mix_alpha"):
        validate(Config(mix="mixup", mix_alpha=0.0))
    with pytest.raises(ConfigError, match="mix_alpha"):
        validate(Config(mix_alpha=0.2))  # an alpha without a mix would be silently unused
    validate(Config(mix="cutmix", mix_alpha=0.2))


def test_a_kd_step_gives_teacher_and_student_the_same_mixed_image_and_ce_the_mixed_labels(tmp_path: Path) -> None:
    """One training step of KD with mixup, the teacher live: the teacher's and the student's inputs are the
    mixed batch made by hand from the normalised view, and the CE term is the cross-entropy to its mixed labels."""
    from distillistic.training import engine
    from distillistic.training.run import build_task
    from distillistic.training.runtime import resolve_runtime
    from distillistic.training.setup import resolve

    cfg = resolve(tiny(tmp_path / "run", algo="kd", teacher="cnn", teacher_weights="random", mix="mixup",
                       mix_alpha=0.7, augment="none", precision="fp64", device="cpu", batch_size=16,
                       max_train_samples=64))
    task, assembly = build_task(cfg, resolve_runtime(cfg))
    assert assembly.teacher_outputs == MIX_LIVE
    seen: dict[str, torch.Tensor] = {}
    assert task.teacher is not None
    task.teacher.raw.register_forward_hook(lambda _m, inp, _o: seen.__setitem__("teacher", inp[0].detach()))
    task.students[0].raw.register_forward_hook(lambda _m, inp, _o: seen.__setitem__("student", inp[0].detach()))
    outs: list[dict[str, torch.Tensor]] = []
    original = task.objective.__class__.__call__

    def spy(self, i, z, inp, targets, weights):  # type: ignore[no-untyped-def]
        out = original(self, i, z, inp, targets, weights)
        outs.append({"ce": out["ce"].detach(), "z": z.detach()})
        return out

    batch = next(iter(task.views.prepare(task.loaders["train"].epoch(0))))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(task.objective.__class__, "__call__", spy)
        engine.train_step(task, batch, 0.0, engine.TrainMeters(task))
    plain = (batch.images.double() / 255 - task.views.mean) / task.views.std
    params = task.views.mix.params(batch.epoch, batch.index, *plain.shape[-2:])  # type: ignore[union-attr]
    lam = params["lam"]
    mixed = lam * plain + (1 - lam) * plain.roll(1, 0)
    torch.testing.assert_close(seen["student"], mixed.expand(-1, seen["student"].shape[1], -1, -1))
    torch.testing.assert_close(seen["teacher"], seen["student"], rtol=0, atol=0)
    labels = batch.labels
    soft = lam * F.one_hot(labels, 10).double() + (1 - lam) * F.one_hot(labels.roll(1, 0), 10).double()
    expected = -(soft * F.log_softmax(outs[0]["z"], dim=1)).sum(1).mean()
    torch.testing.assert_close(outs[0]["ce"], expected, rtol=1e-12, atol=0)
    assert 0.0 < lam < 1.0


@pytest.mark.e2e
@pytest.mark.parametrize(("algo", "mix", "extra"), [
    ("kd", "cutmix", {"teacher": "cnn", "teacher_weights": "random"}),
    ("dml", "mixup", {}),
    ("at", "mixup", {"teacher": "cnn", "teacher_weights": "random"}),
])
def test_mix_runs_with_kd_dml_and_a_feature_method(tmp_path: Path, algo: str, mix: str, extra: dict) -> None:
    from distillistic.training.run import train

    result = train(tiny(tmp_path / "run", algo=algo, mix=mix, max_train_samples=128, batch_size=32, **extra))
    assert result.summary["status"] == "completed"
    manifest = json.loads((result.out / "manifest.json").read_text())
    if "teacher" in extra:
        assert manifest["teacher_outputs"].startswith("live")
    rows = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train" and r["model"].startswith("student")]
    assert train_rows
    assert all(r["ce"] > 0 and r["loss"] == r["loss"] for r in train_rows)
