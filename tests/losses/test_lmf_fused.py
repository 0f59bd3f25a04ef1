"""The fused dense LMF (closed-form gradient) against the composite a·LDAM + b·focal path."""

from __future__ import annotations

import pytest
import torch

from welde_det.losses import build_loss
from welde_det.losses._common import dense_targets
from welde_det.losses.dense import _LMFDenseSum, lmf_dense_sum

COUNTS = [633, 2033, 4131, 1921, 151, 122]


def _case(seed=0, n=64, c=6, soft=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 3
    z[:3] = 1e4
    z[3:6] = -1e4
    z[6, :3] = 80.0
    y = torch.randint(-1, c + 1, (n,), generator=g)  # -1 and c are background
    if soft:
        return z, torch.rand(n, c, generator=g) * (torch.rand(n, c, generator=g) < 0.3)
    return z, y


@pytest.mark.parametrize("kw", [
    {}, {"a": 0.3, "b": 2.0, "gamma": 2.0, "s": 10.0}, {"gamma": 1.0}, {"gamma": 0.0}, {"gamma": 0.5},
    {"gamma": 2.7}, {"drw_epoch": 0}, {"s": 1.0, "max_m": 0.0},
])
@pytest.mark.parametrize("soft", [False, True])
def test_fused_matches_composite_loss_and_gradient(kw, soft):
    loss = build_loss("lmf", class_counts=COUNTS, activation="sigmoid", **kw)
    z, target = _case(soft=soft)
    z1 = z.clone().requires_grad_()
    fused = loss(z1, target, normalizer=7.5)
    fused.backward()
    z2 = z.clone().requires_grad_()
    composite = loss._elementwise(z2, dense_targets(target, 6)).sum() / 7.5
    composite.backward()
    assert float(fused) == pytest.approx(float(composite), rel=1e-6)
    assert torch.isfinite(z1.grad).all()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.7, 1.0, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("drw", [False, True])
def test_closed_form_gradient_gradcheck(gamma, drw):
    g = torch.Generator().manual_seed(int(gamma * 10) + drw)
    z = torch.randn(7, 4, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.rand(7, 4, generator=g, dtype=torch.float64) * (torch.rand(7, 4, generator=g) < 0.5)
    margins = torch.rand(4, generator=g, dtype=torch.float64) * 0.5
    alpha = torch.rand(4, generator=g, dtype=torch.float64)
    w = torch.rand(4, generator=g, dtype=torch.float64) + 0.5 if drw else None
    assert torch.autograd.gradcheck(lambda x: _LMFDenseSum.apply(x, t, margins, alpha, w, 3.0, 0.7, 1.3, gamma), (z,))


def test_no_grad_forward_equals_grad_forward():
    z, y = _case(1)
    t = dense_targets(y, 6)
    m = torch.rand(6)
    total, grad = lmf_dense_sum(z, t, m, m, s=30.0, a=1.0, b=1.0, gamma=1.5, need_grad=False)
    assert grad is None
    total2, grad2 = lmf_dense_sum(z, t, m, m, s=30.0, a=1.0, b=1.0, gamma=1.5)
    assert float(total) == float(total2) and grad2.shape == z.shape


def test_targets_that_require_grad_use_the_composite_path():
    loss = build_loss("lmf", class_counts=COUNTS, activation="sigmoid")
    z, t = _case(2, soft=True)
    t = t.requires_grad_()
    out = loss(z.requires_grad_(), t)
    out.backward()
    assert t.grad is not None and torch.isfinite(t.grad).all()


def test_retain_graph_backward_twice():
    loss = build_loss("lmf", class_counts=COUNTS, activation="sigmoid")
    z, y = _case(3)
    z.requires_grad_()
    out = loss(z, y)
    out.backward(retain_graph=True)
    g1 = z.grad.clone()
    out.backward()
    torch.testing.assert_close(z.grad, 2 * g1)
