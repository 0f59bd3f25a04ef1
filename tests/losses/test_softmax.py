"""Softmax-family losses against their formulas, computed independently in numpy (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from welde_det.losses import build_loss

PROFILES = {
    "lumbar": [633, 2033, 4131, 1921, 151, 122],
    "mild": [30, 20, 10],
    "extreme": [10000, 10, 1, 500],
}


def _case(counts, n=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = len(counts)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, c, (n,), generator=g)
    y[: min(n, c)] = torch.arange(min(n, c))  # every class present
    return z, y, np.asarray(counts, dtype=np.float64)


def _logp(z):
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _pick(a, y):
    return a[np.arange(len(y)), np.asarray(y)]


def _margins(n, max_m):
    m = n**-0.25
    return m * max_m / m.max()


def _cb(n, beta):
    w = (1 - beta) / (1 - beta**n)
    return w / w.sum() * len(n)


def ref(name, z, y, n, **kw):
    z, y = z.numpy(), y.numpy()
    c = z.shape[1]
    lp = _pick(_logp(z), y)
    if name == "ce":
        return -lp.mean()
    if name == "wce":
        w = (n.sum() / n) / c
        return (-w[y] * lp).sum() / len(y)
    if name == "bwcce":
        w = (1 - n / n.sum()) / (c - 1)
        return (-w[y] * lp).sum() / len(y)
    if name == "focal":
        g = kw.get("gamma", 2.0)
        a = kw.get("alpha")
        alpha = np.ones(c) if a is None else _margins(n, kw.get("max_m", 0.5)) if a == "ldam" else np.asarray(a)
        return (-alpha[y] * (1 - np.exp(lp)) ** g * lp).mean()
    if name == "cb":
        w = _cb(n, kw.get("beta", 0.9999))
        if kw.get("base", "ce") == "focal":
            g = kw.get("gamma", 2.0)
            return (-w[y] * (1 - np.exp(lp)) ** g * lp).sum() / len(y)
        return (-w[y] * lp).sum() / len(y)
    if name == "ldam":
        s, m = kw.get("s", 30.0), _margins(n, kw.get("max_m", 0.5))
        zz = z.copy()
        zz[np.arange(len(y)), y] -= m[y]
        return -_pick(_logp(s * zz), y).mean()
    if name == "lmf":
        a, b = kw.get("a", 1.0), kw.get("b", 1.0)
        ld = ref("ldam", torch.from_numpy(z), torch.from_numpy(y), n, s=kw.get("s", 30.0), max_m=kw.get("max_m", 0.5))
        fo = ref("focal", torch.from_numpy(z), torch.from_numpy(y), n, gamma=kw.get("gamma", 1.5), alpha="ldam",
                 max_m=kw.get("max_m", 0.5))
        return a * ld + b * fo
    p = np.exp(_logp(z))
    t = np.eye(c)[y]
    tp = (p * t).sum(0)
    fp = (p * (1 - t)).sum(0)
    fn = ((1 - p) * t).sum(0)
    tn = ((1 - p) * (1 - t)).sum(0)
    eps = 1e-7
    f1 = 1 - (2 * tp / (2 * tp + fp + fn + eps)).mean()
    mcc = 1 - ((tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn) + eps)).mean()
    lam = kw.get("lam", 1.0)
    return {"soft_f1": f1, "soft_mcc": mcc, "ce_f1": -lp.mean() + lam * f1, "ce_mcc": -lp.mean() + lam * mcc}[name]


CASES = [
    ("ce", {}),
    ("wce", {}),
    ("bwcce", {}),
    ("focal", {}),
    ("focal", {"gamma": 0.5, "alpha": "ldam", "max_m": 0.3}),
    ("cb", {}),
    ("cb", {"beta": 0.99, "base": "focal", "gamma": 1.0}),
    ("ldam", {}),
    ("ldam", {"s": 1.0, "max_m": 0.8}),
    ("lmf", {}),
    ("lmf", {"a": 0.3, "b": 2.0, "gamma": 2.0, "s": 10.0}),
    ("soft_f1", {}),
    ("soft_mcc", {}),
    ("ce_f1", {"lam": 0.5}),
    ("ce_mcc", {}),
]


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize(("name", "kw"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_formula(name, kw, profile):
    z, y, n = _case(PROFILES[profile])
    loss = build_loss(name, class_counts=PROFILES[profile], **kw)
    got = float(loss(z, y))
    assert got == pytest.approx(ref(name, z, y, n, **kw), rel=1e-5, abs=1e-6)


def test_hand_computed_ce_and_wce():
    # two classes, counts 3:1 -> wce weights (4/3)/2 = 2/3 and (4/1)/2 = 2
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    y = torch.tensor([1, 0])
    ce = build_loss("ce")(z, y)
    assert float(ce) == pytest.approx((np.log(2) + np.log(1 + np.exp(-2))) / 2, rel=1e-6)
    wce = build_loss("wce", class_counts=[3, 1])(z, y)
    assert float(wce) == pytest.approx((2 * np.log(2) + (2 / 3) * np.log(1 + np.exp(-2))) / 2, rel=1e-6)


def test_weighted_losses_divide_by_n_not_weight_sum():
    z, y, n = _case([50, 5, 1], n=9)
    for name in ("wce", "cb", "bwcce"):
        ours = float(build_loss(name, class_counts=n.tolist())(z, y))
        w = build_loss(name, class_counts=n.tolist()).weight.double()
        torch_style = float(torch.nn.functional.cross_entropy(z, y, weight=w))
        per = torch.nn.functional.cross_entropy(z, y, reduction="none")
        assert ours == pytest.approx(float((w[y] * per).sum() / len(y)), rel=1e-6)
        assert ours != pytest.approx(torch_style, rel=1e-3)


def test_focal_gamma0_is_ce_and_ldam_m0_is_scaled_ce():
    z, y, n = _case([40, 7, 2])
    ce = torch.nn.functional.cross_entropy
    assert float(build_loss("focal", gamma=0.0)(z, y)) == pytest.approx(float(ce(z, y)), rel=1e-6)
    ldam0 = build_loss("ldam", class_counts=n.tolist(), max_m=0.0, s=7.0)
    assert float(ldam0(z, y)) == pytest.approx(float(ce(7.0 * z, y)), rel=1e-6)


def test_lmf_is_a_ldam_plus_b_focal():
    z, y, n = _case(PROFILES["lumbar"])
    kw = {"max_m": 0.4, "s": 20.0}
    lmf = build_loss("lmf", class_counts=n.tolist(), a=0.7, b=1.3, gamma=1.5, **kw)
    ldam = build_loss("ldam", class_counts=n.tolist(), **kw)
    focal = build_loss("focal", class_counts=n.tolist(), gamma=1.5, alpha="ldam", max_m=0.4)
    assert float(lmf(z, y)) == pytest.approx(0.7 * float(ldam(z, y)) + 1.3 * float(focal(z, y)), rel=1e-6)


def test_drw_switches_weights_on_at_epoch():
    z, y, n = _case([100, 10, 1])
    loss = build_loss("ldam", class_counts=n.tolist(), drw_epoch=2, drw_beta=0.999)
    before = float(loss(z, y))
    loss.set_epoch(1)
    assert float(loss(z, y)) == pytest.approx(before)
    loss.set_epoch(2)
    w = _cb(n, 0.999)
    zz = z.numpy().copy()
    m = _margins(n, 0.5)
    zz[np.arange(len(y)), y.numpy()] -= m[y.numpy()]
    expected = (-w[y.numpy()] * _pick(_logp(30 * zz), y.numpy())).sum() / len(y)
    assert float(loss(z, y)) == pytest.approx(expected, rel=1e-5)
