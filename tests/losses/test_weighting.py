"""Weight and margin helpers on their own, against hand computation."""

from __future__ import annotations

import pytest
import torch

from welde_det.losses import (
    bwcce_weights,
    class_balanced_weights,
    inverse_frequency_weights,
    ldam_margins,
)


def test_inverse_frequency():
    w = inverse_frequency_weights([30, 10, 60])
    # N_total = 100, C = 3: (100/30)/3, (100/10)/3, (100/60)/3
    assert w.tolist() == pytest.approx([100 / 90, 100 / 30, 100 / 180])


def test_bwcce():
    w = bwcce_weights([30, 10, 60])
    assert w.tolist() == pytest.approx([0.5 * 0.7, 0.5 * 0.9, 0.5 * 0.4])
    with pytest.raises(ValueError, match="two classes"):
        bwcce_weights([5])


def test_class_balanced_sum_is_c_and_limits():
    w = class_balanced_weights([100, 10, 1], beta=0.9)
    raw = torch.tensor([(0.1) / (1 - 0.9**100), 0.1 / (1 - 0.9**10), 0.1 / (1 - 0.9)], dtype=torch.float64)
    assert w.tolist() == pytest.approx((raw / raw.sum() * 3).tolist(), rel=1e-6)
    assert float(class_balanced_weights([5, 50, 500], beta=0.0).sum()) == pytest.approx(3.0)
    assert class_balanced_weights([5, 50, 500], beta=0.0).tolist() == pytest.approx([1.0, 1.0, 1.0])
    near_inv = class_balanced_weights([1, 2, 4], beta=1 - 1e-9)
    assert (near_inv / near_inv[2]).tolist() == pytest.approx([4.0, 2.0, 1.0], rel=1e-5)
    with pytest.raises(ValueError, match="beta"):
        class_balanced_weights([1, 2], beta=1.0)


def test_ldam_margins():
    m = ldam_margins([10000, 16, 1], max_m=0.5)
    assert m.tolist() == pytest.approx([0.05, 0.25, 0.5], rel=1e-6)
    assert float(ldam_margins([7, 7], max_m=0.3).max()) == pytest.approx(0.3)
