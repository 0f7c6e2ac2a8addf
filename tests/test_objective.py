"""The objective: returned terms, values, alpha warm-up, printed formulas; the registries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from _util import tiny
from distillistic import train
from distillistic.config import Config
from distillistic.core.objective import Distill, Objective
from distillistic.core.signals import Teacher
from distillistic.errors import UserError
from distillistic.methods.registry import METHODS, Context, register_method
from distillistic.methods.tfkd import Virtual
from distillistic.models.builders import build_model
from distillistic.models.stages import class_head, feature_shapes, stage_modules, stage_names
from distillistic.registry import Registry
from distillistic.training import engine, setup


class _Probe:
    """The models a feature method probes: a cnn student and a cnn teacher on 8 px, 1-channel images."""

    n_data = 100

    def __init__(self) -> None:
        self.models = {"student": build_model("cnn", 10, 1, 8), "teacher": build_model("cnn", 10, 1, 8)}

    def stages(self, role: str, i: int = 0) -> tuple[str, ...]:
        return stage_names("cnn", self.models[role])

    def shapes(self, role: str, stages: Any, i: int = 0) -> dict[str, tuple[int, ...]]:
        return feature_shapes("cnn", self.models[role], stages, 1, 8, role)

    def stage_modules(self, role: str, i: int = 0) -> dict[str, torch.nn.Module]:
        return stage_modules("cnn", self.models[role])

    def classifier(self, role: str, stage: str, i: int = 0) -> torch.nn.Linear:
        return class_head("cnn", self.models[role], stage, 1, 8, role)


def _objective(algo: str, **overrides: Any) -> Objective:
    cfg = setup.resolve(Config(algo=algo, dataset="synthetic", **overrides))
    teacher = Teacher(torch.nn.Linear(2, 2), None, 1) if METHODS.get(algo).needs_teacher else None
    return METHODS.get(algo).objective(cfg, Context(teacher, 10, cfg.students or 1, _Probe()))


FORMULAS = {
    ("baseline", ()): "L = CE(z, y)",
    ("kd", ()): "L = 0.5·CE(z, y) + 0.5·20²·KL(softmax(t/20) ‖ softmax(z/20))",
    ("dml", ()): "L = 0.5·CE(z, y) + 0.5·mean_(j≠i) KL(softmax(z_j) ‖ softmax(z))",
    ("dml_e", ()): "L = 0.5·CE(z, y) + 0.5·KL(mean_(j≠i) softmax(z_j) ‖ softmax(z))",
    ("tfkd", ()): "L = 0.5·CE(z, y) + 0.5·KL(v(p=0.9) ‖ softmax(z))",
    ("tfkd", (("virtual_smooth", True),)): "L = 0.5·CE(z, y) + 0.5·KL(softmax(v(p=0.9)/20) ‖ softmax(z))/K",
    ("kd", (("temperature", 4.0), ("alpha", 0.9), ("divergence", "mse"))):
        "L = 0.1·CE(z, y) + 0.9·4²·MSE(softmax(t/4) ‖ softmax(z/4))",
    ("dml", (("temperature", 3.0), ("alpha", 0.3), ("alpha_warmup", 0.2), ("divergence", "js"))):
        "L = 0.7·CE(z, y) + 0.3·mean_(j≠i) 3²·JS(softmax(z_j/3) ‖ softmax(z/3)), alpha rising from 0 over the "
        "first 20% of training",
    ("pcl", ()): "L = CE(z, y) + r(p)·3²·KL(mean_(j≠i) softmax(z'_j/3) ‖ softmax(z/3)), z'_j = EMA(0.999) of "
                 "student j, r ramping up over 25% of training",
    ("ban", ()): "L = CE(z, y)",  # generation 1; generation g is kd from generation g - 1 (test_ema_methods.py)
    # logit-based methods
    ("ls", ()): "L = CE((1-0.1)·onehot(y) + 0.1/K, softmax(z))",
    ("dkd", ()): "L = CE(z, y) + min(e/0.0833, 1)·4²·(1·TCKD + 8·NCKD)(softmax(t/4) ‖ softmax(z/4))",
    ("dist", ()): "L = CE(z, y) + 4²·(2·inter + 2·intra)(softmax(t/4), softmax(z/4))",
    ("ctkd", ()): "L = 0.1·CE(z, y) + 0.9·T²·KL(softmax(t/T) ‖ softmax(z/T)), T = 1 + 20·sigmoid(θ), θ trained "
                  "through gradient reversal (λ: cosine 0 → 1 over the first 0.0417 of training)",
    ("kdcl", ()): "L = 0.5·CE(z, y) + 0.5·KL(softmax(min_m (z_m - z_m,y)) ‖ softmax(z))",
    ("tfkd_self", ()): "L = 0.5·CE(z, y) + 0.5·20²·KL(softmax(t/20) ‖ softmax(z/20))",
    ("kd", (("logit_standardize", True),)):  # the authors' 0.1·CE + 9·KD at T = 2
        "L = 0.1·CE(z, y) + 9·2²·KL(softmax(t/2) ‖ softmax(z/2)) on z-scored logits",
    ("kd", (("temperature", 4.0), ("alpha", 0.5), ("logit_standardize", True))):  # the user's alpha and T
        "L = 0.5·CE(z, y) + 0.5·4²·KL(softmax(t/4) ‖ softmax(z/4)) on z-scored logits",
    ("dkd", (("logit_standardize", True),)):  # α and β times 9, T = 2
        "L = CE(z, y) + min(e/0.0833, 1)·2²·(9·TCKD + 72·NCKD)(softmax(t/2) ‖ softmax(z/2)) on z-scored logits",
    ("fitnet", ()): "L = CE(z, y) + 100·MSE(r(F_s), F_t)[stage2]",
    ("at", ()): "L = CE(z, y) + 1000·AT(F_s, F_t)[stage1, stage2]",
    ("at", (("feature_kd", 0.9), ("feature_weight", 500.0))):
        "L = CE(z, y) + 500·AT(F_s, F_t)[stage1, stage2] + 0.9·4²·KL(softmax(t/4) ‖ softmax(z/4))",
    ("sp", ()): "L = CE(z, y) + 3000·SP(F_s, F_t)[stage2]",
    ("rkd", ()): "L = CE(z, y) + (25·RKD_D + 50·RKD_A)(e_s, e_t)",
    ("crd", ()): "L = CE(z, y) + 0.8·CRD(e_s, e_t; K=99, τ=0.07)",
    ("catkd", ()): "L = CE(z, y) + 15·CAT(CAM_s, CAM_t; 2x2)[stage2]",
    ("simkd", ()): "L = 0·CE(z, y) + MSE(P(F_s), F_t)[stage2], z = W_t·avg(P(F_s))",
    ("reviewkd", ()): "L = CE(z, y) + 5·min(e/0.0833, 1)·HCL(ABF(F_s), F_t)[stage1, stage2, embedding]",
    ("nkd", ()): "L = CE(z, y) + [−q_y·log p_y − 3.5·3²·Σ_(k≠y) q̂_k·log p̂_k](q = softmax(t), p = softmax(z); q̂, p̂ "
                 "at T = 3 over k ≠ y)",
    ("ttm", ()): "L = CE(z, y) + 45·KL(softmax(t)^0.1/U_0.1 ‖ softmax(z))",
    ("wttm", ()): "L = CE(z, y) + 4·U_0.2(softmax(t))·KL(softmax(t)^0.2/U_0.2 ‖ softmax(z))",
    ("mlkd", ()): "L = 0.1·CE(z, y) + 0.1·CE(z_s, y) + 0.9·Σ_τ[m·KD_τ + c_m·CC_τ + m·BC_τ](z_w, t_w) + 0.9·Σ_(τ∈4,3,5) "
                  "KD_τ(z_s, t_s) + 0.9·Σ_(τ∈2,6) KD_τ(z_w, t_w), τ ∈ {4, 3, 5, 2, 6}; z_s, t_s on RandAugment(2, 10) "
                  "of the view",
    ("dot", ()): "L = 0.1·CE(z, y) + 0.9·4²·KL(softmax(t/4) ‖ softmax(z/4)) [DOT: SGD momentum 0.825 for CE's "
                 "gradient, 0.975 for KD's]",
}


@pytest.mark.parametrize(("algo", "overrides"), list(FORMULAS))
def test_printed_formula(algo: str, overrides: tuple[tuple[str, Any], ...]) -> None:
    assert str(_objective(algo, **dict(overrides))) == FORMULAS[(algo, overrides)]


def test_every_registered_method_has_a_formula() -> None:
    assert {algo for algo, _ in FORMULAS} == set(METHODS.names())


@pytest.mark.parametrize("algo", ["baseline", "tfkd"])
def test_returned_keys_and_values(algo: str) -> None:
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
    objective = _objective(algo, alpha=0.3) if algo != "baseline" else _objective(algo)
    inp = _step(y)
    targets = objective.targets(inp)
    out = objective(0, z, inp, targets, objective.weights_at(0.0))
    ce = F.cross_entropy(z, y)
    if algo == "baseline":
        assert set(out) == {"loss", "ce"}
        assert objective.names == ["loss", "ce"]
        torch.testing.assert_close(out["loss"], ce)  # alpha is ignored without terms
        return
    assert set(out) == {"loss", "ce", "tfkd"}
    assert objective.names == ["loss", "ce", "tfkd"]
    q = targets["tfkd"]
    assert q is not None
    kl = F.kl_div(F.log_softmax(z, 1), q[0][0], reduction="batchmean")
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["tfkd"], kl)
    torch.testing.assert_close(out["loss"], 0.7 * ce + 0.3 * kl)


def _step(labels: torch.Tensor) -> Any:
    from distillistic.core.signals import StepInputs
    from distillistic.data.views import Views

    return StepInputs(Views(torch.zeros(len(labels), 1, 2, 2), False), labels, [torch.zeros(len(labels), 10)], 10)


def test_term_weights_and_several_terms() -> None:
    virtual = Virtual(0.9, False)
    objective = Objective((Distill("a", virtual, "kl", 2.0, weight=0.5), Distill("b", virtual, "mse", 1.0)), alpha=0.4)
    assert str(objective) == "L = 0.6·CE(z, y) + 0.4·[0.5·2²·KL(v(p=0.9) ‖ softmax(z/2)) + MSE(v(p=0.9) ‖ softmax(z))]"
    z, y = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    inp = _step(y)
    q = virtual.targets(inp, 1.0)[0]
    out = objective(0, z, inp, objective.targets(inp), objective.weights_at(1.0))
    kl = 4 * F.kl_div(F.log_softmax(z / 2, 1), q[0], reduction="batchmean")
    mse = ((z.softmax(1) - q[0]) ** 2).sum(1).mean()
    torch.testing.assert_close(out["loss"], 0.6 * F.cross_entropy(z, y) + 0.4 * (0.5 * kl + mse))


def test_alpha_warmup_values() -> None:
    objective = _objective("tfkd", alpha=0.5, alpha_warmup=0.2)
    assert [objective.alpha_at(p) for p in (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)] == pytest.approx(
        [0.0, 0.125, 0.25, 0.5, 0.5, 0.5])
    assert _objective("tfkd", alpha=0.5).alpha_at(0.0) == 0.5  # no warm-up: alpha from the first step
    assert _objective("baseline").alpha_at(0.5) == 0.0


def test_the_loop_warms_alpha_up_step_by_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    alphas: list[tuple[int, float]] = []
    original = engine.train_step

    def record(task: Any, batch: Any, progress: float, meters: Any) -> None:
        alphas.append((batch.epoch, task.objective.weights_at(progress)["tfkd"]))
        original(task, batch, progress, meters)

    monkeypatch.setattr(engine, "train_step", record)
    train(tiny(tmp_path / "run", algo="tfkd", epochs=2, alpha=0.6, alpha_warmup=0.5, batch_size=128))
    steps = sum(1 for e, _ in alphas if e == 0)
    assert steps == 1259 // 128  # digits' train split, ragged batch dropped
    first = [a for e, a in alphas if e == 0]
    assert first == pytest.approx([0.6 * s / steps for s in range(steps)])  # 0 -> 0.6 over the first half
    assert [a for e, a in alphas if e == 1] == pytest.approx([0.6] * steps)


# --- registries ----------------------------------------------------------------------------------------


def test_registry_refuses_duplicates_and_lists_valid_names() -> None:
    reg: Registry[int] = Registry("widget")
    reg.add("one", 1)
    with pytest.raises(ValueError, match="widget 'one' is already registered"):
        reg.add("one", 2)
    assert reg.get("one") == 1
    with pytest.raises(UserError, match=r"unknown widget 'onr' \(did you mean 'one'\?\); choose one of: one"):
        reg.get("onr")
    kd = METHODS.get("kd")
    with pytest.raises(ValueError, match="algorithm 'kd' is already registered"):
        register_method(kd.spec, lambda cfg, ctx: ())
    assert METHODS.get("kd").reference.startswith("Hinton, Vinyals, Dean 2015")


def test_methods_declare_their_students_and_temperature() -> None:
    resolved = {a: setup.resolve(Config(algo=a, dataset="synthetic"))
                for a in ("baseline", "kd", "dml", "dml_e", "tfkd")}  # later methods: in their own tests
    assert {a: c.students for a, c in resolved.items()} == {"baseline": 1, "kd": 1, "dml": 3, "dml_e": 3, "tfkd": 1}
    assert {a: c.temperature for a, c in resolved.items()} == {"baseline": None, "kd": 20.0, "dml": 1.0,
                                                              "dml_e": 1.0, "tfkd": 1.0}
    assert setup.resolve(Config(algo="tfkd", virtual_smooth=True, dataset="synthetic")).temperature == 20.0
    assert resolved["kd"].teacher == ("resnet50",)
    assert resolved["dml"].teacher is None


# --- alpha where a method ignores it ---------------------------------------------------------------------------

SUM_METHODS = [name for name in METHODS.names() if METHODS.get(name).composition == "sum"]


@pytest.mark.parametrize("name", SUM_METHODS)
def test_alpha_given_to_a_method_that_weighs_its_own_terms_is_refused(name: str) -> None:
    """A sum composition ignores alpha: given explicitly (even at 0.5, its old default) it is one clear error
    naming the method and its own weights; unset, the resolved config says so (alpha None, no alpha logged)."""
    spec = METHODS.get(name)
    assert spec.weights, f"{name} should name the keys that weigh its terms"
    for key, value in (("alpha", 0.5), ("alpha", 0.9), ("alpha", 0.0), ("alpha_warmup", 0.2)):
        with pytest.raises(UserError) as err:
            setup.resolve(Config(algo=name, dataset="synthetic", **{key: value}))
        message = str(err.value)
        assert message.startswith(f"config key '{key}' is not used by algo {name}: "), message
        assert f"remove {key} and set {', '.join(spec.weights)} instead" in message
    cfg = setup.resolve(Config(algo=name, dataset="synthetic"))
    assert cfg.alpha is None
    assert _objective(name).alpha_at(0.5) is None


def test_methods_of_the_thesis_composition_take_alpha_with_its_default() -> None:
    assert {"kd", "dml", "kdcl", "tfkd", "ctkd"} <= {n for n in METHODS.names() if n not in SUM_METHODS}
    assert setup.resolve(Config(algo="kd", dataset="synthetic")).alpha == 0.5
    assert setup.resolve(Config(algo="kd", dataset="synthetic", alpha=0.5)).alpha == 0.5
    assert setup.resolve(Config(algo="dml", dataset="synthetic", alpha=0.2, alpha_warmup=0.2)).alpha == 0.2
    assert str(_objective("kd", alpha=0.7)).startswith("L = 0.3·CE(z, y) + 0.7·")


def test_alpha_for_dkd_is_refused_from_a_flag_yaml_set_and_a_sweep(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from _util import run_cli
    from distillistic.experiments.grid import expand

    base = ["train", "--dataset", "digits", "--model", "cnn", "--teacher", "cnn", "--teacher-weights", "random",
            "--epochs", "1", "--out", str(tmp_path / "run")]
    config = tmp_path / "dkd.yaml"
    config.write_text("algo: dkd\nalpha: 0.5\n")
    for argv in ([*base, "--algo", "dkd", "--alpha", "0.5"], [*base, str(config)],
                 [*base, "--algo", "dkd", "--set", "alpha=0.3"]):
        rc, _, err = run_cli(argv, capsys)
        assert rc == 2, argv
        assert len(err) == 1, err
        assert "config key 'alpha' is not used by algo dkd" in err[0]
        assert "dkd_alpha, dkd_beta, dkd_warmup" in err[0]
    assert not (tmp_path / "run").exists()
    # a sweep's shared key reaches the cells whose method reads it, and is refused when no cell reads it
    spec: dict[str, Any] = {"dataset": "digits", "teacher": "cnn", "alpha": 0.5,
                            "variants": {"kd": {"algo": "kd"}, "dkd": {"algo": "dkd"}}}
    cells = {c.name: c.config for c in expand(spec).cells}
    assert (cells["kd"].alpha, cells["dkd"].alpha) == (0.5, None)
    with pytest.raises(UserError, match="config key 'alpha' is read by no cell's algorithm"):
        expand({"dataset": "digits", "teacher": "cnn", "alpha": 0.5, "grid": {"algo": ["dkd", "dist"]}})
    with pytest.raises(UserError, match="cell 'dkd': config key 'alpha' is not used by algo dkd"):
        expand({"dataset": "digits", "teacher": "cnn", "variants": {"kd": {"algo": "kd"},
                                                                    "dkd": {"algo": "dkd", "alpha": 0.5}}})
    spec = {"dataset": "digits", "teacher": "cnn",
            "variants": {"kd": {"algo": "kd", "alpha": 0.5}, "dkd": {"algo": "dkd"}}}  # alpha where it is used
    cells = {c.name: c.config for c in expand(spec).cells}
    assert (cells["kd"].alpha, cells["dkd"].alpha) == (0.5, None)
