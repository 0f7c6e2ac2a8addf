"""CAT-KD against a float64 transcription of the authors' code, value and gradient to 1e-10.

Reference: GzyAftermath/CAT-KD at commit 4467073ca31b9929e7c45f5a6761e5e1b7c9442f: ``CAT_loss`` and
``_Normalize`` of ``mdistiller/distillers/CAT_KD.py`` (lines 72-81) and ``forward_train`` (lines 54-56), with the
class activation maps of the ``_test`` models (``mdistiller/models/cifar/resnet.py``, ``ResNet_test``: a bias-free
1x1 ``conv_test`` on the last stage, whose weight ``tools/train.py`` lines 121-142 copy from the teacher's
``fc.weight``), transcribed below with only the ``torch`` calls they make.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distillistic.errors import UserError
from distillistic.methods.catkd import cat_loss, class_activation
from distillistic.models.builders import build_model
from distillistic.models.stages import class_head

pytestmark = pytest.mark.unit


# --- the reference, as the authors write it ----------------------------------------------------------------------


def _Normalize(feat, IF_NORMALIZE):  # type: ignore[no-untyped-def]
    if IF_NORMALIZE:
        feat = F.normalize(feat, dim=(2, 3))
    return feat


def CAT_loss(CAM_Student, CAM_Teacher, CAM_RESOLUTION, IF_NORMALIZE):  # type: ignore[no-untyped-def]
    CAM_Student = F.adaptive_avg_pool2d(CAM_Student, (CAM_RESOLUTION, CAM_RESOLUTION))
    CAM_Teacher = F.adaptive_avg_pool2d(CAM_Teacher, (CAM_RESOLUTION, CAM_RESOLUTION))
    loss = F.mse_loss(_Normalize(CAM_Student, IF_NORMALIZE), _Normalize(CAM_Teacher, IF_NORMALIZE))
    return loss


def ref_forward(f_s: torch.Tensor, f_t: torch.Tensor, w_s: torch.Tensor, w_t: torch.Tensor, beta: float,
                resolution: int, normalize: bool) -> torch.Tensor:
    """The ``_test`` models' last feature (``conv_test`` on the last stage) and ``forward_train``'s CAT term."""
    k, c_s = w_s.shape
    conv_s = nn.Conv2d(c_s, k, kernel_size=1, padding=0, bias=False).double()
    conv_t = nn.Conv2d(w_t.shape[1], k, kernel_size=1, padding=0, bias=False).double()
    del conv_s.weight
    conv_s.weight = w_s.view(k, c_s, 1, 1)  # type: ignore[assignment]  # the student's trainable classifier
    with torch.no_grad():
        conv_t.weight.copy_(w_t.view(k, w_t.shape[1], 1, 1))
        tea = conv_t(f_t)
    stu = conv_s(f_s)
    return beta * CAT_loss(stu, tea, resolution, normalize)


# --- the comparison ---------------------------------------------------------------------------------------------


def _rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


@pytest.mark.parametrize("scale", [1.0, 1e3])
@pytest.mark.parametrize(("resolution", "normalize", "grids"), [(2, False, (8, 8)), (4, True, (8, 4)),
                                                                 (2, True, (7, 5)), (1, False, (4, 4))])
def test_cat_loss_and_gradients_match_the_authors(resolution: int, normalize: bool, grids: tuple[int, int],
                                                  scale: float) -> None:
    b, k, c_s, c_t = 3, 5, 4, 6
    f_s, f_t = _rand(b, c_s, grids[0], grids[0], seed=1, scale=scale), _rand(b, c_t, grids[1], grids[1], seed=2)
    w_s, w_t = _rand(k, c_s, seed=3), _rand(k, c_t, seed=4, scale=scale)
    mine_f, mine_w = f_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    ref_f, ref_w = f_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    loss = 15.0 * cat_loss(class_activation(mine_f, mine_w), class_activation(f_t, w_t), resolution, normalize)
    ref = ref_forward(ref_f, f_t, ref_w, w_t, 15.0, resolution, normalize)
    assert loss.dtype == torch.float64
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-10, abs_tol=1e-12)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(mine_f.grad, ref_f.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mine_w.grad, ref_w.grad, rtol=1e-10, atol=1e-12)


def test_the_pooled_class_map_is_the_logit_less_its_bias() -> None:
    """The cnn's class head reads the spatial mean of its last stage: mean(W·F) + b are its logits."""
    model = build_model("cnn", 10, 1, 28).double().eval()
    head = class_head("cnn", model, "stage2", 1, 28, "student")
    assert head is model.fc
    x = _rand(2, 1, 28, 28, seed=5)
    maps = model.features(x)
    cam = class_activation(maps, head.weight)
    torch.testing.assert_close(cam.mean((2, 3)) + head.bias, model(x), rtol=1e-10, atol=1e-12)


def test_a_model_whose_head_is_not_a_pooled_linear_layer_is_refused() -> None:
    model = build_model("wrn_16_1", 10, 3, 32)  # block3 is followed by BN + ReLU before the pooling
    with pytest.raises(UserError, match="does not classify the global average of its stage3 map"):
        class_head("wrn_16_1", model, "stage3", 3, 32, "teacher")
