"""Teaching signals: the thesis's claim C1 (DML = DML_e in gradient), the virtual teacher, the frozen teacher."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.overrides import TorchFunctionMode

from distillistic.config import Config
from distillistic.core.signals import StepInputs, Teacher, Teaching
from distillistic.data.views import Views
from distillistic.methods.dml import Peers
from distillistic.methods.registry import METHODS, Context
from distillistic.methods.tfkd import Virtual
from distillistic.training import setup


def _inputs(logits: list[torch.Tensor], labels: torch.Tensor, k: int, base: torch.Tensor | None = None) -> StepInputs:
    views = Views(base if base is not None else torch.zeros(len(labels), 1, 4, 4), channels_last=False)
    return StepInputs(views, labels, [z.detach() for z in logits], k)


def _cohort_gradients(algo: str, logits: list[torch.Tensor], labels: torch.Tensor, t: float,
                      alpha: float) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Each student's gradient w.r.t. its logits under the real objective of ``algo`` (one backward)."""
    cfg = setup.resolve(Config(algo=algo, dataset="synthetic", students=len(logits), temperature=t, alpha=alpha))
    objective = METHODS.get(algo).objective(cfg, Context(None, logits[0].shape[1], len(logits)))
    leaves = [z.clone().requires_grad_(True) for z in logits]
    # the signal gets the live logits: detaching the peers is the signal's own job (the loop detaches too)
    inp = StepInputs(Views(torch.zeros(len(labels), 1, 4, 4), False), labels, leaves, logits[0].shape[1])
    targets = objective.targets(inp)
    weights = objective.weights_at(1.0)
    outs = [objective(i, z, inp, targets, weights) for i, z in enumerate(leaves)]
    torch.stack([o["loss"] for o in outs]).sum().backward()
    return [z.grad for z in leaves], outs  # type: ignore[misc]


@settings(max_examples=60, deadline=None)
@given(n=st.sampled_from([2, 3, 5]), t=st.one_of(st.sampled_from([1.0, 4.0, 20.0]), st.floats(0.5, 30.0)),
       b=st.integers(1, 12), k=st.integers(2, 12), scale=st.floats(0.1, 8.0), alpha=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**31 - 1))
def test_dml_and_dml_e_give_identical_gradients(n: int, t: float, b: int, k: int, scale: float, alpha: float,
                                                seed: int) -> None:
    """Thesis claim C1 (DESIGN.md, section 3): pairwise peers and the mean of the peers train identically."""
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(b, k, generator=g) * scale for _ in range(n)]
    labels = torch.randint(0, k, (b,), generator=g)
    grads_dml, outs_dml = _cohort_gradients("dml", logits, labels, t, alpha)
    grads_e, outs_e = _cohort_gradients("dml_e", logits, labels, t, alpha)
    p = [torch.softmax(z.double() / t, dim=1) for z in logits]
    for i in range(n):
        torch.testing.assert_close(grads_dml[i], grads_e[i], rtol=1e-4, atol=2e-6)
        # and both equal the analytic gradient (1-a)/B (softmax(z) - y) + a T/B (p_i - mean_j p_j)
        peers = sum(p[j] for j in range(n) if j != i) / (n - 1)
        ce = (torch.softmax(logits[i].double(), 1) - F.one_hot(labels, k).double()) / b
        expected = (1 - alpha) * ce + alpha * (t / b) * (p[i] - peers)
        torch.testing.assert_close(grads_dml[i].double(), expected, rtol=1e-4, atol=2e-6)
        assert set(outs_dml[i]) == {"loss", "ce", "dml"}
        assert set(outs_e[i]) == {"loss", "ce", "dml_e"}


def test_dml_and_dml_e_losses_differ_by_the_peers_entropy() -> None:
    """The loss values differ (for N > 2) although the gradients agree: the difference is constant in z_i."""
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(6, 5, generator=g) * 2 for _ in range(3)]
    labels = torch.randint(0, 5, (6,), generator=g)
    _, outs_dml = _cohort_gradients("dml", logits, labels, 2.0, 0.5)
    _, outs_e = _cohort_gradients("dml_e", logits, labels, 2.0, 0.5)
    for i in range(3):
        peers = [torch.softmax(logits[j] / 2.0, 1) for j in range(3) if j != i]
        mean = sum(peers) / 2
        entropy = lambda q: -(q * q.log()).sum(1).mean()  # noqa: E731
        # mean_j KL(p_j || p_i) - KL(mean p_j || p_i) = H(mean p_j) - mean_j H(p_j), times T^2
        gap = 4.0 * (entropy(mean) - sum(entropy(q) for q in peers) / 2)
        assert float((outs_dml[i]["dml"] - outs_e[i]["dml_e"]).detach()) == pytest.approx(float(gap), rel=1e-4)
        assert float(gap) > 1e-3  # the values really differ (entropy is concave: H(mean) > mean H)


def test_peers_targets_are_detached_and_shaped() -> None:
    logits = [torch.randn(4, 3, requires_grad=True) for _ in range(3)]
    inp = StepInputs(Views(torch.zeros(4, 1, 2, 2), False), torch.zeros(4, dtype=torch.long), list(logits), 3)
    pairwise = Peers("pairwise", name="dml").targets(inp, 2.0)
    mean = Peers("mean", name="dml_e").targets(inp, 2.0)
    for i in range(3):
        assert pairwise[i].shape == (2, 4, 3)
        assert mean[i].shape == (1, 4, 3)
        assert not pairwise[i].requires_grad
        assert not mean[i].requires_grad
        others = [torch.softmax(logits[j].detach() / 2.0, 1) for j in range(3) if j != i]
        torch.testing.assert_close(pairwise[i], torch.stack(others))
        torch.testing.assert_close(mean[i][0], sum(others) / 2)
    with pytest.raises(ValueError, match="at least 2"):
        Peers("mean", name="dml_e").targets(StepInputs(inp.views, inp.labels, logits[:1], 3), 1.0)
    with pytest.raises(ValueError, match="pairwise or mean"):
        Peers("median", name="x")  # type: ignore[arg-type]


# --- the virtual teacher (DESIGN.md, section 4) --------------------------------------------------------


def test_virtual_teacher_golden_values() -> None:
    labels = torch.tensor([3, 0, 9])
    v = Virtual(0.9, smooth=False).distribution(labels, 10)
    assert v.shape == (3, 10)
    for row, y in zip(v, labels.tolist()):
        assert float(row[y]) == pytest.approx(0.9)
        others = torch.cat([row[:y], row[y + 1 :]])
        torch.testing.assert_close(others, torch.full((9,), 0.1 / 9))
        assert float(others[0]) == pytest.approx(0.011111, abs=1e-6)
    torch.testing.assert_close(v.sum(1), torch.ones(3))


def test_smoothed_virtual_teacher_at_t20_is_near_uniform() -> None:
    labels = torch.tensor([2, 7])
    inp = _inputs([torch.zeros(2, 10)], labels, 10)
    q = Virtual(0.9, smooth=True).targets(inp, 20.0)[0][0]
    true_exp, other_exp = math.exp(0.9 / 20), math.exp((0.1 / 9) / 20)
    true = true_exp / (true_exp + 9 * other_exp)
    assert true == pytest.approx(0.104, abs=5e-4)  # DESIGN.md: the true class ~0.104
    for row, y in zip(q, labels.tolist()):
        assert float(row[y]) == pytest.approx(true, rel=1e-6)
        assert float(row.sum()) == pytest.approx(1.0, abs=1e-6)
        assert float((row - 0.1).abs().max()) < 0.005  # every class ~0.1
    # calibrated (smooth=False): the distribution as is, whatever the temperature
    plain = Virtual(0.9, smooth=False).targets(inp, 20.0)[0][0]
    torch.testing.assert_close(plain, Virtual(0.9, smooth=False).distribution(labels, 10))


class _CountCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("smooth", [False, True])
def test_virtual_teacher_is_vectorised(smooth: bool) -> None:
    """The same number of torch calls for 4 samples and for 200 000: no per-sample Python loop."""
    counts = []
    for b in (4, 200_000):
        labels = torch.arange(b) % 10
        inp = _inputs([torch.zeros(b, 10)], labels, 10)
        with _CountCalls() as mode:
            q = Virtual(0.8, smooth=smooth).targets(inp, 3.0)[0]
        counts.append(mode.calls)
        assert q.shape == (1, b, 10)
    assert counts[0] == counts[1]
    expected = torch.full((10,), 0.2 / 9)
    expected[7] = 0.8
    expected = torch.softmax(expected / 3.0, 0) if smooth else expected
    torch.testing.assert_close(q[0, 199_997], expected)  # the last batch had labels 0..9 repeating


# --- the frozen teacher ------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(1)
        self.fc = nn.Linear(16, 5)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return self.fc(self.bn(x).flatten(1))


def test_teacher_is_frozen_cached_and_reads_its_own_view() -> None:
    net = _Net()
    teacher = Teacher(net, view_size=4, channels=1)
    assert not net.training
    assert all(not p.requires_grad for p in net.parameters())
    base = torch.randn(6, 1, 8, 8)
    inp = _inputs([torch.zeros(6, 5, requires_grad=True)] * 2, torch.zeros(6, dtype=torch.long), 5, base=base)
    net.train()  # a stray .train() must not switch BatchNorm to batch statistics
    with pytest.raises(RuntimeError, match="teaching stage"):
        teacher.targets(inp, 4.0)  # a term reads the teacher's outputs; the teaching stage computes them
    assert net.inputs == []
    with torch.enable_grad():
        Teaching.of(teacher)(inp)  # the step's teaching stage: the teacher's one forward
        q1 = teacher.targets(inp, 4.0)
        q2 = teacher.targets(inp, 1.0)
    assert len(net.inputs) == 1  # one forward per step, whatever the number of terms
    assert not net.training
    assert torch.equal(net.bn.running_mean, torch.zeros(1))  # eval mode: statistics untouched
    assert net.inputs[0].shape == (6, 1, 4, 4)
    torch.testing.assert_close(net.inputs[0], F.interpolate(base, size=(4, 4), mode="bilinear", antialias=True))
    with torch.no_grad():
        expected = net.fc(net.bn(net.inputs[0]).flatten(1))
    for q, t in ((q1, 4.0), (q2, 1.0)):
        assert len(q) == 2
        assert q[0].shape == (1, 6, 5)
        assert not q[0].requires_grad
        assert q[0].grad_fn is None
        torch.testing.assert_close(q[0][0], torch.softmax(expected / t, 1))
