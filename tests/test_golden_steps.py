"""Golden steps: every loss term of every registered method over the first 3 steps, at a fixed seed.

The values in ``golden/steps.json`` were recorded before the core redesign, from whole ``train()`` runs; they
are now checked at step level (``build_task`` and ``train_step``, a fraction of a second per method), and the
redesign, and every change after it, must reproduce them to 1e-6. A newly registered method gets its own entry
with ``make golden NAME=<variant>`` (``python tests/test_golden_steps.py --record NAME``; no NAME: every
variant), so the check covers every method of the registry: a method without a recorded entry fails here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

GOLDEN = Path(__file__).with_name("golden") / "steps.json"
STEPS = 3
# Synthetic data, the small cnn, 3 steps of batch 32: a stable model, so float32 rounding stays far below 1e-6.
BASE: dict[str, Any] = dict(dataset="synthetic", synthetic_samples=160, split_fractions=(0.6, 0.2, 0.2),
                            image_size=8, model="cnn", epochs=1, batch_size=32, lr=1e-3, seed=3,
                            progress=False, tensorboard=False, num_workers=0, threads=1, device="cpu")
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"algo": "baseline"},
    "kd": {"algo": "kd", "teacher": "cnn", "teacher_weights": "random", "temperature": 4.0},
    "dml": {"algo": "dml", "students": 3},
    "dml_e": {"algo": "dml_e", "students": 3},
    "tfkd": {"algo": "tfkd"},
    "tfkd_smoothed": {"algo": "tfkd", "virtual_smooth": True},
    "pcl": {"algo": "pcl", "students": 2},
    "ban": {"algo": "ban", "generations": 2, "allow_weak_teacher": True},  # 3 steps: generation 2's teacher is weak
    "baseline_ema": {"algo": "baseline", "ema": 0.9},
    # logit-based methods
    "ls": {"algo": "ls"},
    "dkd": {"algo": "dkd", "teacher": "cnn", "teacher_weights": "random"},
    "dist": {"algo": "dist", "teacher": "cnn", "teacher_weights": "random"},
    "ctkd": {"algo": "ctkd", "teacher": "cnn", "teacher_weights": "random", "alpha": 0.9},
    "kdcl": {"algo": "kdcl", "students": 2, "temperature": 2.0},
    "kdcl_independent": {"algo": "kdcl", "students": 2, "temperature": 2.0, "augment": "randaugment",
                         "peer_views": "independent"},
    "tfkd_self": {"algo": "tfkd_self", "teacher_weights": "random", "temperature": 4.0},
    "kd_standardized": {"algo": "kd", "teacher": "cnn", "teacher_weights": "random", "temperature": 2.0,
                        "logit_standardize": True},
    "dml_standardized": {"algo": "dml", "students": 2, "temperature": 2.0, "logit_standardize": True},
    "fitnet": {"algo": "fitnet", "teacher": "cnn", "teacher_weights": "random"},
    "at_kd": {"algo": "at", "teacher": "cnn", "teacher_weights": "random", "feature_kd": 0.9},
    "sp": {"algo": "sp", "teacher": "cnn", "teacher_weights": "random"},
    "rkd": {"algo": "rkd", "teacher": "cnn", "teacher_weights": "random"},
    "crd": {"algo": "crd", "teacher": "cnn", "teacher_weights": "random", "crd_negatives": 64},
    "reviewkd": {"algo": "reviewkd", "teacher": "cnn", "teacher_weights": "random"},
    "nkd": {"algo": "nkd", "teacher": "cnn", "teacher_weights": "random"},
    "ttm": {"algo": "ttm", "teacher": "cnn", "teacher_weights": "random"},
    "wttm": {"algo": "wttm", "teacher": "cnn", "teacher_weights": "random"},
    "mlkd": {"algo": "mlkd", "teacher": "cnn", "teacher_weights": "random"},
    "dot": {"algo": "dot", "teacher": "cnn", "teacher_weights": "random", "lr": 0.05},
    "catkd": {"algo": "catkd", "teacher": "cnn", "teacher_weights": "random"},
    "simkd": {"algo": "simkd", "teacher": "cnn", "teacher_weights": "random"},
}


def record(variant: str, out: Path) -> list[list[dict[str, float]]]:
    """The loss dict of each student at each of the first ``STEPS`` steps: ``[step][student]{term: value}``.

    Step level: ``build_task`` and ``STEPS`` calls of ``train_step`` on the first batches of epoch 0, at the
    progress the loop gives them; a born-again method's first generation. The values equal those of the first
    steps of a whole ``train()`` (which recorded ``golden/steps.json``): nothing between the task's assembly and
    the first step draws a random number.
    """
    from distillistic import Config
    from distillistic.methods.registry import METHODS
    from distillistic.training import setup
    from distillistic.training.engine import TrainMeters, train_step
    from distillistic.training.run import build_task
    from distillistic.training.runtime import resolve_runtime

    cfg = setup.resolve(Config(**(BASE | VARIANTS[variant] | {"out": str(out)})))
    method = METHODS.get(cfg.algo)
    if method.generations is not None:  # generation 1 (generation 2's teacher is generation 1 trained)
        cfg = method.generation(cfg, 1, None).replace(out=str(out / "generation1"))
    rt = resolve_runtime(cfg)
    steps: list[list[dict[str, float]]] = []
    original = TrainMeters.update

    def spy(self: TrainMeters, logits: Any, labels: Any, outs: list[dict[str, torch.Tensor]], *a: Any) -> None:
        steps.append([{k: float(v.detach()) for k, v in o.items()} for o in outs])
        original(self, logits, labels, outs, *a)

    TrainMeters.update = spy  # type: ignore[method-assign]
    try:
        task, _ = build_task(cfg, rt)
        for student in task.students:
            student.model.train()
        meters, loader = TrainMeters(task), task.loaders["train"]
        batches = task.views.prepare(loader.epoch(0))
        for step, batch in zip(range(STEPS), batches):
            train_step(task, batch, step / len(loader) / cfg.epochs, meters)
    finally:
        TrainMeters.update = original  # type: ignore[method-assign]
        rt.close()
    assert len(steps) == STEPS
    return steps


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_golden_steps(variant: str, tmp_path: Path) -> None:
    golden = json.loads(GOLDEN.read_text())
    assert variant in golden, f"no golden steps for {variant}: record them with 'python {__file__} --record'"
    got = record(variant, tmp_path / "run")
    want = golden[variant]
    for step, (g, w) in enumerate(zip(got, want)):
        for student, (gs, ws) in enumerate(zip(g, w)):
            assert set(gs) == set(ws), (step, student)
            for key in ws:
                assert gs[key] == pytest.approx(ws[key], abs=1e-6, rel=0), (variant, step, student, key)


def test_every_registered_method_has_golden_steps() -> None:
    """A newly registered method fails here until its steps are recorded (add it to VARIANTS, then --record)."""
    from distillistic.methods.registry import METHODS

    recorded = json.loads(GOLDEN.read_text())
    covered = {VARIANTS[name]["algo"] for name in VARIANTS if name in recorded}
    assert set(METHODS.names()) <= covered, f"no golden steps for {sorted(set(METHODS.names()) - covered)}"


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    names = sys.argv[sys.argv.index("--record") + 1:] or list(VARIANTS)
    data = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            data[name] = record(name, Path(tmp) / "run")
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")

