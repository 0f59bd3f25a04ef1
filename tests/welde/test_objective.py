"""WELDE objective: the three properties of METHOD.md §3, EMA maths, state_dict, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from welde_det.losses import build_loss
from welde_det.welde import WELDEHeads, WELDEObjective, build_welde, js_diversity

COUNTS = [633, 2033, 4131, 1921, 151, 122]


class Scaled(torch.nn.Module):
    """A component loss multiplied by a constant (to test scale invariance)."""

    def __init__(self, base, factor):
        super().__init__()
        self.base, self.factor = base, factor

    def forward(self, logits, target, **kw):
        return self.factor * self.base(logits, target, **kw)


def _batch(seed, n=64, d=16, c=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


def _feature_grad_norms(scale, steps=60):
    """Per-component gradient norm sent into the shared feature after warm-up."""
    torch.manual_seed(0)
    heads = WELDEHeads(16, 6, ["ce", "focal", "cb", "ldam"])
    losses = [build_loss(n, class_counts=COUNTS) for n in ("ce", "focal", "cb", "ldam")]
    losses[1] = Scaled(losses[1], scale)
    obj = WELDEObjective(list(zip(("ce", "focal", "cb", "ldam"), losses)), warmup_steps=10, diversity=0.0)
    opt = torch.optim.SGD([*heads.parameters(), *obj.parameters()], lr=0.05)
    for step in range(steps):
        x, y = _batch(step)
        out = obj(heads(x), y)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert not obj.in_warmup
    x, y = _batch(999)
    feat = x.clone().requires_grad_()
    logits = heads(feat)
    # gradient of component 1's weighted, normalised term only
    m_hat = obj.ema_estimate()
    w = obj.effective_weights()
    term = w[1] * losses[1](logits[1], y) / (m_hat[1] + 1e-8)
    (g,) = torch.autograd.grad(term, feat)
    return g.norm().item()


def test_property1_gradient_balancing_under_1000x_scale():
    base = _feature_grad_norms(1.0)
    scaled = _feature_grad_norms(1000.0)
    assert base > 0
    assert abs(scaled - base) / base < 0.05


def test_property2_non_degeneracy():
    torch.manual_seed(0)
    heads = WELDEHeads(16, 6, ["ce", "focal", "cb", "ldam"])
    names = ("ce", "focal", "cb", "ldam")
    losses = [build_loss(n, class_counts=COUNTS) for n in names]
    losses[0] = Scaled(losses[0], 100.0)
    floor = 0.05
    obj = WELDEObjective(list(zip(names, losses)), weight_floor=floor, warmup_steps=50)
    opt = torch.optim.Adam([*heads.parameters(), *obj.parameters()], lr=1e-2)
    for step in range(500):
        x, y = _batch(step)
        out = obj(heads(x), y)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    w = obj.effective_weights().detach()
    assert (w >= floor - 1e-7).all(), w
    assert abs(float(w.sum()) - 1.0) <= 0.1, w
    assert float(w.max()) < 0.9  # no single component took over


def test_property3_reduction_to_ce():
    torch.manual_seed(0)
    z = torch.randn(32, 6, requires_grad=True)
    y = torch.randint(0, 6, (32,))
    k = 3
    obj = WELDEObjective([("ce", build_loss("ce"))] * k, diversity=0.0, warmup_steps=10**6)
    for _ in range(5):  # fill the EMA with a few steps
        obj([z] * k, y)
    out = obj([z] * k, y)
    (g,) = torch.autograd.grad(out["loss"], z)
    ce = F.cross_entropy(z, y)
    (g_ce,) = torch.autograd.grad(ce, z)
    m_hat = float(obj.ema_estimate()[0])
    torch.testing.assert_close(g, g_ce / (m_hat + 1e-8), rtol=1e-5, atol=1e-7)


def test_ema_bias_correction_by_hand():
    obj = WELDEObjective({"ce": build_loss("ce")}, ema_momentum=0.9, warmup_steps=0)
    z = torch.zeros(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    out = obj([z], y)
    # after one step m = 0.1 * log 3, m_hat = m / (1 - 0.9) = log 3
    assert float(obj.ema[0]) == pytest.approx(0.1 * math.log(3), rel=1e-6)
    assert float(out["norm_ce"]) == pytest.approx(1.0, rel=1e-6)
    obj([z * 0 + torch.tensor([1.0, 0, 0])], y)
    l2 = float(F.cross_entropy(torch.tensor([[1.0, 0, 0]]).repeat(4, 1), y))
    m2 = 0.9 * 0.1 * math.log(3) + 0.1 * l2
    assert float(obj.ema_estimate()[0]) == pytest.approx(m2 / (1 - 0.81), rel=1e-6)


def test_warmup_holds_weights_and_theta_gets_no_gradient():
    obj = WELDEObjective({"ce": build_loss("ce"), "focal": build_loss("focal")}, warmup_steps=3)
    z, y = torch.randn(8, 3, requires_grad=True), torch.randint(0, 3, (8,))
    for _ in range(3):
        out = obj([z, z], y)
        assert float(out["weight_ce"]) == 0.5
        out["loss"].backward()
        assert obj.theta.grad is None or float(obj.theta.grad.abs().sum()) == 0
    out = obj([z, z], y)
    out["loss"].backward()
    assert float(obj.theta.grad.abs().sum()) > 0


def test_penalty_and_floor_with_straight_through_gradient():
    obj = WELDEObjective({"a": build_loss("ce"), "b": build_loss("ce")}, warmup_steps=0, weight_floor=0.1,
                         sum_penalty=10.0, diversity=0.0)
    with torch.no_grad():
        obj.theta.copy_(torch.tensor([math.log(math.expm1(0.01)), math.log(math.expm1(0.7))]))
    z, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    out = obj([z, z], y)
    assert float(out["weight_a"]) == pytest.approx(0.1)
    assert float(out["penalty"]) == pytest.approx(10 * (0.1 + 0.7 - 1) ** 2, rel=1e-5)
    out["loss"].backward()
    assert obj.theta.grad[0] != 0  # the floored weight still gets a gradient


def test_diversity_bounds_and_values():
    p = torch.tensor([[1.0, 0.0]])
    q = torch.tensor([[0.0, 1.0]])
    assert float(js_diversity([p, q])) == pytest.approx(math.log(2))
    assert float(js_diversity([p, p])) == pytest.approx(0.0)
    r = torch.rand(50, 4).softmax(1)
    s = torch.rand(50, 4).softmax(1)
    assert 0 <= float(js_diversity([r, s, r])) <= math.log(2)
    # sigmoid: Bernoulli JS of 1 vs 0 is log 2
    assert float(js_diversity([torch.ones(3, 2), torch.zeros(3, 2)], "sigmoid")) == pytest.approx(math.log(2))


def test_sigmoid_diversity_uses_foreground_only():
    obj = WELDEObjective({"a": build_loss("ce", activation="sigmoid"), "b": build_loss("ce", activation="sigmoid")},
                         activation="sigmoid", warmup_steps=0)
    za = torch.tensor([[10.0, -10.0], [10.0, 10.0]])
    zb = torch.tensor([[10.0, -10.0], [-10.0, -10.0]])
    # row 0 is foreground (identical heads), row 1 background (opposite heads)
    out = obj([za, zb], torch.tensor([0, -1]))
    assert float(out["diversity"]) == pytest.approx(0.0, abs=1e-6)
    soft = torch.tensor([[0.0, 0.0], [0.0, 0.7]])
    out = obj([za, zb], soft)
    assert float(out["diversity"]) > 0.6


def test_returns_documented_keys():
    heads, obj = build_welde(["ce", "focal", "cb", "ldam"], class_counts=COUNTS, num_classes=6, in_dim=8)
    out = obj(heads(torch.randn(10, 8)), torch.randint(0, 6, (10,)))
    expected = {"loss", "diversity", "penalty"} | {f"{p}_{n}" for p in ("loss", "norm", "weight")
                                                   for n in ("ce", "focal", "cb", "ldam")}
    assert set(out) == expected
    assert out["loss"].requires_grad and not out["loss_ce"].requires_grad


def test_state_dict_round_trip_keeps_weights_and_ema():
    _heads, obj = build_welde(["ce", "focal"], class_counts=COUNTS, num_classes=6, in_dim=8, warmup_steps=1)
    opt = torch.optim.SGD(obj.parameters(), lr=0.5)
    for _ in range(4):
        x, y = torch.randn(10, 6, requires_grad=True), torch.randint(0, 6, (10,))
        out = obj([x, x * 2], y)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    _, again = build_welde(["ce", "focal"], class_counts=COUNTS, num_classes=6, in_dim=8, warmup_steps=1)
    again.load_state_dict(obj.state_dict())
    torch.testing.assert_close(again.ema, obj.ema)
    assert int(again.num_steps) == 4
    torch.testing.assert_close(again.fusion_weights(), obj.fusion_weights())


def test_duplicate_names_get_suffixes_and_bad_input():
    obj = WELDEObjective([("ce", build_loss("ce"))] * 3)
    assert obj.names == ("ce", "ce_1", "ce_2")
    with pytest.raises(ValueError, match="3 components"):
        obj([torch.zeros(2, 3)], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="weight_floor"):
        WELDEObjective([("ce", build_loss("ce"))] * 4, weight_floor=0.3)
    with pytest.raises(ValueError, match="unknown softmax loss 'lfm'"):
        build_welde(["ce", "lfm"], class_counts=COUNTS, num_classes=6, in_dim=4)
    with pytest.raises(FloatingPointError, match="not finite"):
        WELDEObjective({"ce": build_loss("ce", validate=False)})([torch.full((2, 3), float("nan"))], torch.tensor([0, 1]))


def test_single_loss_objective_is_the_plain_loss():
    from welde_det.welde import single_loss_objective

    z = torch.randn(16, 6, requires_grad=True)
    y = torch.randint(0, 6, (16,))
    obj = single_loss_objective("ce", build_loss("ce"))
    for _ in range(3):
        out = obj([z], y)
        torch.testing.assert_close(out["loss"], F.cross_entropy(z, y))
    (g,) = torch.autograd.grad(out["loss"], z)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(z, y), z)
    torch.testing.assert_close(g, g_ce)


def _js_pairwise_reference(probs, activation="softmax"):
    """The plain O(K²) loop of the definition, with xlogy."""
    def ent(p):
        if activation == "softmax":
            return -torch.special.xlogy(p, p).sum(-1)
        return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))
    k = len(probs)
    total = 0.0
    for i in range(k):
        for j in range(i + 1, k):
            total = total + (ent(0.5 * (probs[i] + probs[j])) - 0.5 * (ent(probs[i]) + ent(probs[j]))).mean()
    return total / (k * (k - 1) / 2)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_batched_js_equals_pairwise_loop(k, activation):
    g = torch.Generator().manual_seed(k)
    z = [torch.randn(40, 6, generator=g) * 2 for _ in range(k)]
    probs = [t.softmax(1) if activation == "softmax" else t.sigmoid() for t in z]
    torch.testing.assert_close(js_diversity(probs, activation), _js_pairwise_reference(probs, activation))


def test_objective_diversity_gradient_finite_when_probabilities_saturate():
    obj = WELDEObjective({"a": build_loss("ce"), "b": build_loss("ce")}, warmup_steps=0)
    z = torch.tensor([[150.0, -3.0, 0.0], [1.0, 2.0, 3.0]], requires_grad=True)
    out = obj([z, z.detach() * 0.5], torch.tensor([0, 2]))
    out["loss"].backward()
    assert torch.isfinite(z.grad).all()
    sig = WELDEObjective({"a": build_loss("ce", activation="sigmoid"), "b": build_loss("ce", activation="sigmoid")},
                         activation="sigmoid", warmup_steps=0)
    zs = torch.tensor([[40.0, -3.0], [1.0, 2.0]], requires_grad=True)
    sig([zs, zs.detach() * 0.1], torch.tensor([0, 1]))["loss"].backward()
    assert torch.isfinite(zs.grad).all()


def test_objective_matches_reference_over_steps():
    """Loss, logged terms and weights follow METHOD.md §3 step by step (EMA, warm-up, floor)."""
    torch.manual_seed(0)
    names = ("ce", "focal", "cb", "ldam")
    losses = [build_loss(n, class_counts=COUNTS) for n in names]
    obj = WELDEObjective(list(zip(names, losses)), warmup_steps=2, diversity=0.1)
    ema, mu = torch.zeros(4), 0.99
    for step in range(1, 6):
        z = [torch.randn(16, 6, requires_grad=True) for _ in names]
        y = torch.randint(0, 6, (16,))
        out = obj(z, y)
        raw = torch.stack([loss(t, y) for loss, t in zip(losses, z)]).detach()
        ema = mu * ema + (1 - mu) * raw
        normed = raw / (ema / (1 - mu**step) + 1e-8)
        w = torch.full((4,), 0.25) if step <= 2 else F.softplus(obj.theta.detach()).clamp_min(0.05)
        # the ldam head's predictive distribution is softmax(s·z), s = 30
        div = _js_pairwise_reference([(t.detach() * (30.0 if n == "ldam" else 1.0)).softmax(1)
                                      for n, t in zip(names, z)])
        pen = 10.0 * (w.sum() - 1) ** 2
        torch.testing.assert_close(out["loss"].detach(), (w * normed).sum() + pen - 0.1 * div)
        torch.testing.assert_close(out["diversity"], div)
        for i, n in enumerate(names):
            torch.testing.assert_close(out[f"loss_{n}"], raw[i])
            torch.testing.assert_close(out[f"norm_{n}"], normed[i])
            torch.testing.assert_close(out[f"weight_{n}"], w[i])
        with torch.no_grad():
            obj.theta.add_(torch.randn(4) * 0.3)  # move the weights so the floor and softplus matter
