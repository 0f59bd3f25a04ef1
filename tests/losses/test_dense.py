"""Dense (sigmoid) losses against their formulas; integer and soft targets; normaliser."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from welde_det.losses import build_loss

COUNTS = [633, 2033, 4131, 1921, 151, 122]


def _case(seed=0, n=11, c=6):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    y = torch.randint(-1, c + 1, (n,), generator=g)  # -1 and c are background
    soft = torch.rand(n, c, generator=g, dtype=torch.float64) * (torch.rand(n, c, generator=g) < 0.2)
    return z, y, soft


def _t(y, c):
    t = np.zeros((len(y), c))
    for i, v in enumerate(y.tolist()):
        if 0 <= v < c:
            t[i, v] = 1
    return t


def _sig(x):
    return 1 / (1 + np.exp(-x))


def _ls(x):
    return -np.logaddexp(0, -x)


def _margins(n, max_m=0.5):
    n = np.asarray(n, float)
    m = n**-0.25
    return m * max_m / m.max()


def _cbw(n, beta=0.9999):
    n = np.asarray(n, float)
    w = (1 - beta) / (1 - beta**n)
    return w / w.sum() * len(n)


def ref(name, z, t, **kw):
    z = z.numpy()
    if name == "ce":
        e = -(t * _ls(z) + (1 - t) * _ls(-z))
    elif name == "focal":
        g = kw.get("gamma", 2.0)
        p = _sig(z)
        e = (t * (1 - p) + (1 - t) * p) ** g * -(t * _ls(z) + (1 - t) * _ls(-z))
        if kw.get("alpha") == "ldam":
            e = e * _margins(COUNTS)
        elif isinstance(kw.get("alpha"), float):
            a = kw["alpha"]
            e = e * (a * t + (1 - a) * (1 - t))
    elif name == "cb":
        e = -(_cbw(COUNTS) * t * _ls(z) + (1 - t) * _ls(-z))
    elif name == "ldam":
        s = kw.get("s", 30.0)
        zz = s * (z - _margins(COUNTS) * t)
        e = -(t * _ls(zz) + (1 - t) * _ls(-zz))
    elif name == "lmf":
        norm = kw.get("norm", len(z))
        return ref("ldam", torch.from_numpy(z), t, s=kw.get("s", 30.0), norm=norm) + ref(
            "focal", torch.from_numpy(z), t, gamma=kw.get("gamma", 1.5), alpha="ldam", norm=norm)
    return e.sum() / kw.get("norm", len(z))


@pytest.mark.parametrize(("name", "kw"), [
    ("ce", {}), ("focal", {}), ("focal", {"gamma": 1.0, "alpha": 0.25}), ("focal", {"alpha": "ldam"}),
    ("cb", {}), ("ldam", {}), ("ldam", {"s": 1.0}), ("lmf", {}),
])
@pytest.mark.parametrize("soft", [False, True])
def test_dense_formula(name, kw, soft):
    z, y, st = _case()
    target = st if soft else y
    t = st.numpy() if soft else _t(y, 6)
    loss = build_loss(name, class_counts=COUNTS, activation="sigmoid", **kw)
    assert float(loss(z, target)) == pytest.approx(ref(name, z, t, **kw), rel=1e-5, abs=1e-7)
    assert float(loss(z, target, normalizer=3.5)) == pytest.approx(ref(name, z, t, norm=3.5, **kw), rel=1e-5)


def test_background_rows_are_all_negative():
    z = torch.tensor([[1.0, -2.0, 0.5]])
    bce = build_loss("ce", activation="sigmoid")
    for bg in (-1, 3):
        expected = float(np.log1p(np.exp(z.numpy())).sum())
        assert float(bce(z, torch.tensor([bg]))) == pytest.approx(expected, rel=1e-6)


def test_cb_weights_positive_term_only():
    z = torch.tensor([[0.3, -0.7, 1.2, 0.0, 0.1, -0.4]])
    cb = build_loss("cb", class_counts=COUNTS, activation="sigmoid")
    bce = build_loss("ce", activation="sigmoid")
    # background row: no positives, so cb == bce
    assert float(cb(z, torch.tensor([-1]))) == pytest.approx(float(bce(z, torch.tensor([-1]))), rel=1e-6)


def test_focal_gamma0_is_bce_and_ldam_m0_is_scaled_bce():
    z, _y, st = _case(3)
    bce = build_loss("ce", activation="sigmoid")
    assert float(build_loss("focal", activation="sigmoid", gamma=0.0)(z, st)) == pytest.approx(float(bce(z, st)))
    ldam = build_loss("ldam", class_counts=COUNTS, activation="sigmoid", max_m=0.0, s=4.0)
    assert float(ldam(z, st)) == pytest.approx(float(bce(4.0 * z, st)), rel=1e-6)


def test_focal_stable_for_extreme_logits():
    z = torch.tensor([[1e4, -1e4, 80.0]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0, 1.0]])
    loss = build_loss("focal", activation="sigmoid")(z, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert loss.item() == pytest.approx(2e4, rel=1e-3)

