"""Adapters, heads and fusion."""

from __future__ import annotations

import pytest
import torch

from welde_det.welde import Adapter, CosineClassifier, WELDEHeads, fuse


def test_adapter_is_identity_at_init_and_learns():
    a = Adapter(12)
    x = torch.randn(4, 12)
    assert torch.equal(a(x), x)
    conv = Adapter(8, conv=True)
    fm = torch.randn(2, 8, 5, 5)
    assert torch.equal(conv(fm), fm)
    a(x).pow(2).sum().backward()
    assert a.up.weight.grad.abs().sum() > 0


def test_heads_shapes_vectors_and_maps_and_cosine_for_margin_losses():
    heads = WELDEHeads(16, 6, ["ce", "focal", "cb", "ldam"])
    outs = heads(torch.randn(3, 16))
    assert [o.shape for o in outs] == [torch.Size([3, 6])] * 4
    assert isinstance(heads.classifiers[3], CosineClassifier)
    assert outs[3].abs().max() <= 1 + 1e-6
    maps = WELDEHeads(16, 6, ["ce", "lmf"], conv=True)(torch.randn(2, 16, 4, 5))
    assert [m.shape for m in maps] == [torch.Size([2, 6, 4, 5])] * 2
    assert maps[1].abs().max() <= 1 + 1e-6


def test_cosine_conv_equals_vector_per_location():
    clf_v = CosineClassifier(8, 3)
    clf_c = CosineClassifier(8, 3, conv=True)
    clf_c.weight.data.copy_(clf_v.weight.data)
    fm = torch.randn(1, 8, 2, 2)
    vec = clf_v(fm.permute(0, 2, 3, 1).reshape(-1, 8))
    torch.testing.assert_close(clf_c(fm).permute(0, 2, 3, 1).reshape(-1, 3), vec)


def test_fusion_valid_distributions_and_weights():
    torch.manual_seed(0)
    logits = [torch.randn(5, 4) for _ in range(3)]
    p = fuse(logits, [0.2, 0.3, 0.5])
    torch.testing.assert_close(p.sum(1), torch.ones(5))
    manual = 0.2 * logits[0].softmax(1) + 0.3 * logits[1].softmax(1) + 0.5 * logits[2].softmax(1)
    torch.testing.assert_close(p, manual)
    # weights are normalised: scaling them changes nothing
    torch.testing.assert_close(fuse(logits, [2.0, 3.0, 5.0]), p)
    s = fuse(logits, None, activation="sigmoid")
    assert ((s >= 0) & (s <= 1)).all()
    torch.testing.assert_close(s, torch.stack([t.sigmoid() for t in logits]).mean(0))
    maps = [torch.randn(2, 4, 3, 3) for _ in range(2)]
    torch.testing.assert_close(fuse(maps).sum(1), torch.ones(2, 3, 3))


def test_fusion_bad_input():
    with pytest.raises(ValueError, match="2 weights for 3 heads"):
        fuse([torch.zeros(1, 2)] * 3, [0.5, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        fuse([torch.zeros(1, 2)] * 2, [1.0, -1.0])
    with pytest.raises(ValueError, match="disagree"):
        fuse([torch.zeros(1, 2), torch.zeros(1, 3)])

