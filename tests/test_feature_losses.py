"""Feature-distillation losses against independent float64 implementations (numpy loops) and identities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distillistic.core.features import pool_to
from distillistic.methods.at import at_loss, attention_map
from distillistic.methods.crd import ContrastMemory, CRDHead, Embed, crd_loss, nce_loss
from distillistic.methods.fitnet import hint_loss, make_regressor
from distillistic.methods.rkd import rkd_loss
from distillistic.methods.sp import sp_loss


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- independent references ---------------------------------------------------------------------------------


def np_adaptive_pool(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """torch's adaptive average pooling: window i spans [floor(i H / h), ceil((i + 1) H / h))."""
    big_h, big_w = x.shape[-2:]
    out = np.zeros((*x.shape[:-2], h, w))
    for i in range(h):
        for j in range(w):
            r0, r1 = (i * big_h) // h, -((-(i + 1) * big_h) // h)
            c0, c1 = (j * big_w) // w, -((-(j + 1) * big_w) // w)
            out[..., i, j] = x[..., r0:r1, c0:c1].mean(axis=(-2, -1))
    return out


def np_attention(f: np.ndarray) -> np.ndarray:
    b = f.shape[0]
    a = np.zeros((b, f.shape[2] * f.shape[3]))
    for n in range(b):
        q = (f[n] ** 2).mean(axis=0).reshape(-1)
        a[n] = q / math.sqrt(float((q**2).sum()))
    return a


def np_at(fs_list: list[np.ndarray], ft_list: list[np.ndarray], beta: float) -> float:
    total = 0.0
    for fs, ft in zip(fs_list, ft_list, strict=True):
        h, w = min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3])
        fs = fs if fs.shape[2:] == (h, w) else np_adaptive_pool(fs, h, w)
        ft = ft if ft.shape[2:] == (h, w) else np_adaptive_pool(ft, h, w)
        total += float(((np_attention(fs) - np_attention(ft)) ** 2).mean())
    return beta * total


def np_sp(fs: np.ndarray, ft: np.ndarray) -> float:
    b = fs.shape[0]

    def gram(f: np.ndarray) -> np.ndarray:
        q = f.reshape(b, -1)
        g = np.array([[float(q[i] @ q[j]) for j in range(b)] for i in range(b)])
        return g / np.sqrt((g**2).sum(axis=1, keepdims=True))

    return float(((gram(fs) - gram(ft)) ** 2).sum()) / b**2


def np_huber(a: np.ndarray, b: np.ndarray) -> float:
    d = np.abs(a - b)
    return float(np.where(d < 1, 0.5 * d**2, d - 0.5).mean())


def np_rkd(s: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    def dist(e: np.ndarray) -> np.ndarray:
        n = len(e)
        d = np.array([[np.linalg.norm(e[i] - e[j]) if i != j else 0.0 for j in range(n)] for i in range(n)])
        return d / d[d > 0].mean()

    def angles(e: np.ndarray) -> np.ndarray:
        n = len(e)
        out = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    u, v = e[j] - e[i], e[k] - e[i]
                    if j != i and k != i:
                        out[i, j, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
        return out.reshape(-1)

    s, t = s.reshape(len(s), -1), t.reshape(len(t), -1)
    return np_huber(dist(s), dist(t)), np_huber(angles(s), angles(t))


# --- pooling, FitNets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "target"), [((8, 8), (4, 4)), ((7, 5), (3, 2)), ((6, 6), (6, 6))])
def test_pool_to_is_adaptive_average_pooling(size: tuple[int, int], target: tuple[int, int]) -> None:
    x = rand(2, 3, *size)
    out = pool_to(x, target)
    assert out.shape == (2, 3, *target)
    np.testing.assert_allclose(out.numpy(), np_adaptive_pool(x.numpy(), *target), rtol=0, atol=1e-14)


def test_pool_to_keeps_a_map_of_the_right_size_and_refuses_to_enlarge() -> None:
    x = rand(1, 2, 4, 4)
    assert pool_to(x, (4, 4)) is x
    with pytest.raises(ValueError, match="only shrinks"):
        pool_to(x, (8, 4))


def test_hint_loss_is_the_elementwise_mean_square_and_only_the_student_gets_gradient() -> None:
    fs, ft = rand(2, 3, 4, 4, seed=1).requires_grad_(), rand(2, 3, 4, 4, seed=2).requires_grad_()
    loss = hint_loss(fs, ft)
    expected = float(((fs.detach().numpy() - ft.detach().numpy()) ** 2).sum()) / fs.numel()
    assert loss.item() == pytest.approx(expected, rel=1e-14)
    loss.backward()
    assert fs.grad is not None
    assert ft.grad is None
    with pytest.raises(ValueError, match="equal shapes"):
        hint_loss(rand(2, 3), rand(2, 4))


@pytest.mark.parametrize(("s_shape", "t_shape"), [
    ((2, 4, 8, 8), (2, 6, 4, 4)),  # student larger: pooled
    ((2, 4, 4, 4), (2, 6, 7, 7)),  # student smaller: interpolated
    ((2, 4, 5, 5), (2, 6, 5, 5)),  # same grid
    ((2, 10), (2, 3)),  # vectors: linear
])
def test_regressor_maps_student_shape_to_teacher_shape_and_trains(s_shape: tuple[int, ...],
                                                                 t_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    reg = make_regressor(s_shape, t_shape).double()
    fs, ft = rand(*s_shape, seed=3), rand(*t_shape, seed=4)
    out = reg(fs)
    assert out.shape == ft.shape
    hint_loss(out, ft).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reg.parameters())


def test_regressor_on_equal_grids_is_conv1x1_then_batch_norm() -> None:
    torch.manual_seed(0)
    reg = make_regressor((3, 2, 4, 4), (3, 5, 4, 4), relu=True).double().eval()
    conv = next(m for m in reg.modules() if isinstance(m, torch.nn.Conv2d))
    x = rand(3, 2, 4, 4, seed=5)
    w = conv.weight.detach().numpy()[:, :, 0, 0]  # [5, 2]
    expected = np.maximum(np.einsum("oc,bchw->bohw", w, x.numpy()) / math.sqrt(1 + 1e-5), 0)  # fresh BN stats
    np.testing.assert_allclose(reg(x).detach().numpy(), expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="4-D or two 2-D"):
        make_regressor((2, 3, 4, 4), (2, 3))


# --- attention transfer -------------------------------------------------------------------------------------


def test_attention_map_golden_unit_norm_and_scale_invariant() -> None:
    f = rand(3, 5, 4, 6)
    a = attention_map(f)
    assert a.shape == (3, 24)
    np.testing.assert_allclose(a.numpy(), np_attention(f.numpy()), rtol=1e-13)
    np.testing.assert_allclose(a.norm(dim=1).numpy(), 1.0, rtol=1e-14)
    np.testing.assert_allclose(attention_map(7.5 * f).numpy(), a.numpy(), rtol=1e-13)


def test_at_loss_golden_with_pooling_either_way() -> None:
    fs = [rand(2, 3, 8, 8, seed=1), rand(2, 4, 3, 3, seed=2)]
    ft = [rand(2, 6, 4, 4, seed=3), rand(2, 5, 6, 6, seed=4)]  # stage 1: student pooled; stage 2: teacher pooled
    expected = np_at([f.numpy() for f in fs], [f.numpy() for f in ft], beta=1000.0)
    assert at_loss(fs, ft).item() == pytest.approx(expected, rel=1e-12)
    assert at_loss(fs, ft, beta=2.0).item() == pytest.approx(expected * 2 / 1000, rel=1e-12)


def test_at_loss_is_zero_for_identical_maps_and_invariant_to_a_positive_scale() -> None:
    fs, ft = [rand(2, 3, 4, 4, seed=1)], [rand(2, 3, 4, 4, seed=2)]
    assert at_loss(fs, [f.clone() for f in fs]).item() == 0.0
    base = at_loss(fs, ft).item()
    assert base > 0
    assert at_loss([3.0 * fs[0]], [0.1 * ft[0]]).item() == pytest.approx(base, rel=1e-12)


def test_at_loss_gradient_reaches_only_the_student() -> None:
    fs, ft = rand(2, 3, 4, 4, seed=1).requires_grad_(), rand(2, 3, 4, 4, seed=2).requires_grad_()
    at_loss([fs], [ft]).backward()
    assert fs.grad is not None
    assert fs.grad.abs().sum() > 0
    assert ft.grad is None
    with pytest.raises(ValueError, match="number of stages"):
        at_loss([fs], [])


# --- similarity preserving ----------------------------------------------------------------------------------


def test_sp_loss_golden_scale_invariant_and_student_only() -> None:
    fs, ft = rand(5, 3, 2, 2, seed=1).requires_grad_(), rand(5, 7, seed=2).requires_grad_()
    loss = sp_loss(fs, ft)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(np_sp(fs.detach().numpy(), ft.detach().numpy()), rel=1e-12)
    assert sp_loss(4.0 * fs, 0.2 * ft).item() == pytest.approx(loss.item(), rel=1e-12)
    assert sp_loss(fs, fs.detach()).item() == 0.0
    loss.backward()
    assert fs.grad is not None
    assert fs.grad.abs().sum() > 0
    assert ft.grad is None


# --- RKD ----------------------------------------------------------------------------------------------------


def test_rkd_loss_golden() -> None:
    es, et = rand(5, 4, seed=1), rand(5, 6, seed=2)
    out = rkd_loss(es, et, w_dist=25.0, w_angle=50.0)
    d, a = np_rkd(es.numpy(), et.numpy())
    assert out["distance"].item() == pytest.approx(d, rel=1e-10)
    assert out["angle"].item() == pytest.approx(a, rel=1e-10)
    assert out["loss"].item() == pytest.approx(25 * d + 50 * a, rel=1e-10)


def test_rkd_is_invariant_to_scaling_an_embedding_and_zero_for_equal_ones() -> None:
    es, et = rand(6, 4, seed=1), rand(6, 4, seed=2)
    base = rkd_loss(es, et)
    scaled = rkd_loss(10.0 * es, 0.3 * et)
    assert scaled["distance"].item() == pytest.approx(base["distance"].item(), rel=1e-10)
    assert scaled["angle"].item() == pytest.approx(base["angle"].item(), rel=1e-10)
    assert rkd_loss(es, 2.0 * es)["loss"].item() == pytest.approx(0.0, abs=1e-12)


def test_rkd_gradient_reaches_only_the_student() -> None:
    es, et = rand(4, 3, seed=1).requires_grad_(), rand(4, 3, seed=2).requires_grad_()
    rkd_loss(es, et)["loss"].backward()
    assert es.grad is not None
    assert torch.isfinite(es.grad).all()
    assert es.grad.abs().sum() > 0
    assert et.grad is None


# --- CRD ----------------------------------------------------------------------------------------------------


def np_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x**2).sum(axis=1, keepdims=True))


def np_nce(p: np.ndarray, n_data: int, eps: float = 1e-7) -> float:
    b, m = p.shape[0], p.shape[1] - 1
    c = m / n_data
    total = 0.0
    for i in range(b):
        total += math.log(p[i, 0] / (p[i, 0] + c + eps))
        for j in range(1, m + 1):
            total += math.log(c / (p[i, j] + c + eps))
    return -total / b


def make_head(n_data: int = 20, k: int = 6, seed: int = 0) -> CRDHead:
    torch.manual_seed(seed)
    return CRDHead(5, 7, n_data, dim=4, k=k, generator=torch.Generator().manual_seed(seed)).double()


def test_embed_is_a_unit_norm_linear_projection() -> None:
    torch.manual_seed(0)
    embed = Embed(12, 128).double()
    x = rand(3, 3, 2, 2)
    v = embed(x).detach().numpy()
    w, b = embed.linear.weight.detach().numpy(), embed.linear.bias.detach().numpy()
    np.testing.assert_allclose(v, np_normalize(x.numpy().reshape(3, 12) @ w.T + b), rtol=1e-13)
    assert v.shape == (3, 128)


def test_crd_loss_golden_sets_z_and_updates_both_banks_exactly() -> None:
    head, n_data = make_head(), 20
    fs, ft = rand(3, 5, seed=1), rand(3, 7, seed=2)
    idx = torch.tensor([4, 0, 17])
    cidx = torch.cat([idx[:, None], torch.randint(0, n_data, (3, 6), generator=torch.Generator().manual_seed(9))], 1)
    mem_s, mem_t = head.memory.memory_s.numpy().copy(), head.memory.memory_t.numpy().copy()

    def emb(e: Embed, x: torch.Tensor) -> np.ndarray:
        return np_normalize(x.numpy() @ e.linear.weight.detach().numpy().T + e.linear.bias.detach().numpy())

    vs, vt = emb(head.embed_s, fs), emb(head.embed_t, ft)
    c = cidx.numpy()
    ex_s = np.array([[math.exp(float(mem_t[c[b, j]] @ vs[b]) / 0.07) for j in range(7)] for b in range(3)])
    ex_t = np.array([[math.exp(float(mem_s[c[b, j]] @ vt[b]) / 0.07) for j in range(7)] for b in range(3)])
    z_s, z_t = ex_s.mean() * n_data, ex_t.mean() * n_data
    expected = np_nce(ex_s / z_s, n_data) + np_nce(ex_t / z_t, n_data)

    loss = head(fs, ft, idx, contrast_idx=cidx)
    assert loss.item() == pytest.approx(expected, rel=1e-11)
    np.testing.assert_allclose(head.memory.z.numpy(), [z_s, z_t], rtol=1e-12)
    for bank, old, v in ((head.memory.memory_s, mem_s, vs), (head.memory.memory_t, mem_t, vt)):
        new = old.copy()
        new[idx.numpy()] = np_normalize(0.5 * old[idx.numpy()] + 0.5 * v)
        np.testing.assert_allclose(bank.numpy(), new, rtol=1e-13, atol=1e-15)


def test_z_is_set_once_and_kept() -> None:
    head = make_head()
    idx = torch.tensor([1, 2])
    head(rand(2, 5, seed=1), rand(2, 7, seed=2), idx, generator=torch.Generator().manual_seed(1))
    z = head.memory.z.clone()
    head(rand(2, 5, seed=3), rand(2, 7, seed=4), idx, generator=torch.Generator().manual_seed(2))
    assert torch.equal(head.memory.z, z)
    assert (z > 0).all()


def test_nce_loss_golden_and_update_formula() -> None:
    x = torch.rand(4, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.01
    assert nce_loss(x, 50).item() == pytest.approx(np_nce(x.numpy(), 50), rel=1e-13)
    mem = ContrastMemory(3, 5, k=2, momentum=0.25, generator=torch.Generator().manual_seed(0)).double()
    old_s = mem.memory_s.clone()
    v = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    mem.update_(torch.tensor([2]), v, v)
    row = 0.25 * old_s[2].numpy() + 0.75 * v[0].numpy()
    np.testing.assert_allclose(mem.memory_s[2].numpy(), row / np.linalg.norm(row), rtol=1e-14)
    assert torch.equal(mem.memory_s[[0, 1, 3, 4]], old_s[[0, 1, 3, 4]])


def test_crd_with_the_paper_defaults_is_finite_and_trains_both_embeddings_not_the_teacher() -> None:
    torch.manual_seed(0)
    head = CRDHead(16, 24, n_data=64, generator=torch.Generator().manual_seed(0))  # dim 128, K 16384, T 0.07
    fs, ft = torch.randn(4, 16, requires_grad=True), torch.randn(4, 24, requires_grad=True)
    loss = head(fs, ft, torch.tensor([0, 5, 9, 63]), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    assert loss.item() > 0
    loss.backward()
    assert fs.grad is not None
    assert ft.grad is None
    assert head.embed_s.linear.weight.grad is not None
    assert head.embed_t.linear.weight.grad is not None


def test_sample_puts_the_positive_first_and_respects_classes() -> None:
    mem = ContrastMemory(4, 30, k=12)
    idx = torch.tensor([3, 29])
    uniform = mem.sample(idx, torch.Generator().manual_seed(0))
    assert uniform.shape == (2, 13)
    assert torch.equal(uniform[:, 0], idx)
    assert uniform.min() >= 0
    assert uniform.max() < 30
    labels = torch.arange(30) % 3
    by_class = mem.sample(idx, torch.Generator().manual_seed(0), labels=labels)
    assert torch.equal(by_class[:, 0], idx)
    for row, i in zip(by_class, idx, strict=True):
        assert (labels[row[1:]] != labels[i]).all()
        assert len(set(row[1:].tolist())) == 12  # 20 candidates >= K: drawn without replacement


def test_memory_restores_exactly_from_state_dict_and_generator_state() -> None:
    head, gen = make_head(seed=0), torch.Generator().manual_seed(11)
    for step in range(3):
        head(rand(3, 5, seed=step), rand(3, 7, seed=10 + step), torch.tensor([step, 7, 12]), generator=gen)
    state, gen_state = {k: v.clone() for k, v in head.state_dict().items()}, gen.get_state()
    assert {"memory.memory_s", "memory.memory_t", "memory.z"} <= set(state)

    restored, gen2 = make_head(seed=5), torch.Generator().manual_seed(999)
    assert not torch.equal(restored.memory.memory_s, state["memory.memory_s"])
    restored.load_state_dict(state)
    gen2.set_state(gen_state)
    args = (rand(3, 5, seed=50), rand(3, 7, seed=51), torch.tensor([1, 2, 3]))
    expected = head(*args, generator=gen)
    got = restored(*args, generator=gen2)
    assert torch.equal(got, expected)
    for key, value in head.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_crd_loss_function_without_update_leaves_the_banks_alone() -> None:
    head = make_head()
    before = head.memory.memory_s.clone()
    crd_loss(rand(2, 5), rand(2, 7), torch.tensor([0, 1]), head.embed_s, head.embed_t, head.memory,
             generator=torch.Generator().manual_seed(0), update=False)
    assert torch.equal(head.memory.memory_s, before)
