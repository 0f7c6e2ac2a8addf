# ruff: noqa: RUF005, RUF059  (the reference is transcribed as its authors wrote it)
"""ReviewKD against a float64 transcription of the authors' code, value and gradient to 1e-10.

Reference: megvii-research/mdistiller, ``mdistiller/distillers/ReviewKD.py`` at commit
a08d46f10d6102bd6e3f258ca5ac880b020ea259 (``hcl_loss`` lines 11-28, ``ReviewKD.forward_train`` lines 80-98,
``ABF`` lines 106-144), transcribed below with only the ``torch`` calls it makes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distillistic.methods.reviewkd import Review, hcl_loss

pytestmark = pytest.mark.unit


# --- the reference, as mdistiller writes it -------------------------------------------------------------------


def ref_hcl_loss(fstudent, fteacher):  # type: ignore[no-untyped-def]
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        n, c, h, w = fs.shape
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt = 1.0
        tot = 1.0
        for l in [4, 2, 1]:  # noqa: E741
            if l >= h:
                continue
            tmpfs = F.adaptive_avg_pool2d(fs, (l, l))
            tmpft = F.adaptive_avg_pool2d(ft, (l, l))
            cnt /= 2.0
            loss += F.mse_loss(tmpfs, tmpft, reduction="mean") * cnt
            tot += cnt
        loss = loss / tot
        loss_all = loss_all + loss
    return loss_all


class RefABF(nn.Module):
    def __init__(self, in_channel, mid_channel, out_channel, fuse):  # type: ignore[no-untyped-def]
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1,
                                             bias=False), nn.BatchNorm2d(out_channel))
        if fuse:
            self.att_conv = nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid())
        else:
            self.att_conv = None

    def forward(self, x, y=None, shape=None, out_shape=None):  # type: ignore[no-untyped-def]
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (shape, shape), mode="nearest")
            z = torch.cat([x, y], dim=1)
            z = self.att_conv(z)
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        y = self.conv2(x)
        return y, x


def ref_review_loss(feats, pooled_feat, teacher_feats, teacher_pooled, in_channels, out_channels, shapes,  # type: ignore[no-untyped-def]
                    out_shapes, states):
    """``ReviewKD.__init__`` (ABFs) and ``forward_train`` (the review and the HCL), ``stu_preact = False``."""
    abfs = nn.ModuleList()
    mid_channel = min(512, in_channels[-1])
    for idx, in_channel in enumerate(in_channels):
        abfs.append(RefABF(in_channel, mid_channel, out_channels[idx], idx < len(in_channels) - 1))
    abfs = abfs.double()  # before loading: a float32 module would round the float64 weights
    for abf, state in zip(abfs, states):
        abf.load_state_dict(state)
    abfs = abfs[::-1]
    x = feats + [pooled_feat.unsqueeze(-1).unsqueeze(-1)]
    x = x[::-1]
    results = []
    out_features, res_features = abfs[0](x[0], out_shape=out_shapes[0])
    results.append(out_features)
    for features, abf, shape, out_shape in zip(x[1:], abfs[1:], shapes[1:], out_shapes[1:]):
        out_features, res_features = abf(features, res_features, shape, out_shape)
        results.insert(0, out_features)
    features_teacher = teacher_feats + [teacher_pooled.unsqueeze(-1).unsqueeze(-1)]
    return ref_hcl_loss(results, features_teacher), abfs


# --- the comparison ---------------------------------------------------------------------------------------------


def _rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


CASES = {  # (student channels, student sizes, teacher channels, teacher sizes); the last entry is the embedding
    "same grids": ((4, 6, 8), (8, 4, 1), (5, 7, 12), (8, 4, 1)),
    "teacher coarser": ((4, 6, 8), (8, 4, 1), (5, 7, 12), (4, 2, 1)),
    "teacher finer": ((3, 5), (4, 1), (6, 9), (8, 1)),
}


@pytest.mark.parametrize("scale", [1.0, 1e3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_review_loss_and_gradients_match_mdistiller(case: str, scale: float) -> None:
    s_ch, s_sz, t_ch, t_sz = CASES[case]
    b = 3
    fs = [_rand(b, c, s, s, seed=k, scale=scale) for k, (c, s) in enumerate(zip(s_ch[:-1], s_sz[:-1]))]
    es = _rand(b, s_ch[-1], seed=10, scale=scale)
    ft = [_rand(b, c, s, s, seed=20 + k, scale=scale) for k, (c, s) in enumerate(zip(t_ch[:-1], t_sz[:-1]))]
    et = _rand(b, t_ch[-1], seed=30, scale=scale)
    torch.manual_seed(0)
    mine = Review(list(s_ch), [(b, c, s, s) for c, s in zip(t_ch[:-1], t_sz[:-1])] + [(b, t_ch[-1])]).double()
    with torch.no_grad():  # non-trivial BN affines and attention biases, so every parameter matters
        for p in mine.parameters():
            p.add_(_rand(*p.shape, seed=p.numel()) * 0.1)
    mine_in = [f.clone().requires_grad_() for f in [*fs, es]]
    ref_in = [f.clone().requires_grad_() for f in [*fs, es]]
    outs = mine([*mine_in[:-1], mine_in[-1][:, :, None, None]], [(s, s) for s in t_sz])
    loss = hcl_loss(outs, [*ft, et[:, :, None, None]])
    ref, ref_abfs = ref_review_loss(ref_in[:-1], ref_in[-1], ft, et, list(s_ch), list(t_ch), list(s_sz)[::-1],
                                    list(t_sz)[::-1], [a.state_dict() for a in mine.abfs])
    assert loss.dtype == torch.float64
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-10, abs_tol=1e-12)
    loss.backward()
    ref.backward()
    for a, r in zip(mine_in, ref_in, strict=True):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-10, atol=1e-12)
    for level, ref_abf in zip(mine.abfs, list(ref_abfs)[::-1], strict=True):
        for (name, p), (_, q) in zip(level.named_parameters(), ref_abf.named_parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_hcl_weights_levels_as_the_reference_by_hand() -> None:
    """An 8x8 level: full + 4x4/2 + 2x2/4 + 1x1/8, over 1 + 1/2 + 1/4 + 1/8; a 1x1 level: the plain MSE."""
    fs, ft = _rand(2, 3, 8, 8, seed=1), _rand(2, 3, 8, 8, seed=2)
    parts = [F.mse_loss(F.adaptive_avg_pool2d(fs, s), F.adaptive_avg_pool2d(ft, s)) for s in (8, 4, 2, 1)]
    expected = (parts[0] + parts[1] / 2 + parts[2] / 4 + parts[3] / 8) / (1 + 1 / 2 + 1 / 4 + 1 / 8)
    e_s, e_t = _rand(2, 5, 1, 1, seed=3), _rand(2, 5, 1, 1, seed=4)
    expected = expected + ((e_s - e_t) ** 2).mean()
    assert math.isclose(float(hcl_loss([fs, e_s], [ft, e_t])), float(expected), rel_tol=1e-12)


def test_hcl_refuses_unequal_shapes() -> None:
    with pytest.raises(ValueError, match="equal shapes"):
        hcl_loss([_rand(1, 2, 4, 4, seed=0)], [_rand(1, 3, 4, 4, seed=0)])
