"""CRD with shared negatives (``--crd-shared-negatives``): one draw of K negatives for the whole batch.

Each sample's loss is the paper's NCE (RepDistiller ``crd/criterion.py``) over those K: the scores equal the
per-sample path's when every sample's row holds the same negatives, and a float64 transcription of the
reference's scoring and NCE (tests/test_feature_losses.py's ``np_nce``) gives the same value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from _util import tiny
from distillistic.methods.crd import CRDHead, Embed
from test_feature_losses import np_nce, np_normalize, rand

N_DATA, K = 30, 9


def _head(shared: bool) -> CRDHead:
    torch.manual_seed(0)
    return CRDHead(5, 7, N_DATA, dim=4, k=K, generator=torch.Generator().manual_seed(0), shared=shared).double()


def test_a_shared_draw_is_one_row_of_k_indices_of_the_dataset() -> None:
    memory = _head(True).memory
    neg = memory.sample_shared(torch.Generator().manual_seed(3))
    assert neg.shape == (K,)
    assert int(neg.min()) >= 0
    assert int(neg.max()) < N_DATA
    assert not torch.equal(neg, memory.sample_shared(torch.Generator().manual_seed(4)))


def test_shared_negatives_score_as_per_sample_rows_that_all_repeat_them() -> None:
    """Value, gradients of both embeddings, Z and the updated banks equal the per-sample path's on rows
    ``[idx_b, n_1 … n_K]`` for every b (the same float64 arithmetic, one product instead of a gather)."""
    shared, per_sample = _head(True), _head(False)
    fs, ft, idx = rand(4, 5, seed=1), rand(4, 7, seed=2), torch.tensor([3, 0, 29, 11])
    neg = shared.memory.sample_shared(torch.Generator().manual_seed(5))
    loss_shared = shared(fs, ft, idx, generator=torch.Generator().manual_seed(5))
    rows = torch.cat([idx[:, None], neg.expand(len(idx), K)], dim=1)
    loss_rows = per_sample(fs, ft, idx, contrast_idx=rows)
    torch.testing.assert_close(loss_shared, loss_rows, rtol=1e-12, atol=0)
    loss_shared.backward()
    loss_rows.backward()
    for a, b in zip(shared.parameters(), per_sample.parameters()):
        assert a.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14)
    for name, buf in shared.memory.named_buffers():
        torch.testing.assert_close(buf, dict(per_sample.memory.named_buffers())[name], rtol=1e-12, atol=1e-15)


def test_shared_negatives_loss_golden() -> None:
    """The reference's scores exp(<m_j, v_b>/τ) over [idx_b, n_1 … n_K], Z from the first batch, NCE of both
    directions, computed in float64 with numpy from the banks and the embeddings."""
    head = _head(True)
    fs, ft, idx = rand(3, 5, seed=6), rand(3, 7, seed=7), torch.tensor([2, 8, 19])
    mem_s, mem_t = head.memory.memory_s.numpy().copy(), head.memory.memory_t.numpy().copy()
    neg = head.memory.sample_shared(torch.Generator().manual_seed(8)).numpy()

    def emb(e: Embed, x: torch.Tensor) -> np.ndarray:
        return np_normalize(x.numpy() @ e.linear.weight.detach().numpy().T + e.linear.bias.detach().numpy())

    vs, vt = emb(head.embed_s, fs), emb(head.embed_t, ft)
    cols = [[int(idx[b]), *map(int, neg)] for b in range(3)]
    ex_s = np.array([[math.exp(float(mem_t[j] @ vs[b]) / 0.07) for j in cols[b]] for b in range(3)])
    ex_t = np.array([[math.exp(float(mem_s[j] @ vt[b]) / 0.07) for j in cols[b]] for b in range(3)])
    expected = np_nce(ex_s / (ex_s.mean() * N_DATA), N_DATA) + np_nce(ex_t / (ex_t.mean() * N_DATA), N_DATA)
    loss = head(fs, ft, idx, generator=torch.Generator().manual_seed(8))
    assert loss.item() == pytest.approx(expected, rel=1e-11)


@pytest.mark.e2e
def test_a_crd_run_with_shared_negatives_trains_and_says_so(tmp_path: Path) -> None:
    from distillistic.training.run import train

    result = train(tiny(tmp_path / "run", algo="crd", model="mlp", teacher="cnn", teacher_weights="random",
                        max_train_samples=128, batch_size=32, crd_shared_negatives=True))
    assert result.summary["status"] == "completed"
    manifest = json.loads((result.out / "manifest.json").read_text())
    assert "K=127 shared" in manifest["objective"]
    rows = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    crd = next(r for r in rows if r["split"] == "train" and r["model"] == "student")["crd"]
    assert math.isfinite(crd)
    assert crd > 0
